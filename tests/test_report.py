"""The HTML reports of a tiny synthetic grid (2 models x 2 seeds), checked as a user sees
them: their tables, how many images they embed, that every image is a real PNG and every
link leads to a file, that nothing needs the network, and that no user file is replaced."""
import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from test_study import MODELS, make_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects the links, image sources, tables (as text rows) and headings of a page."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.tables, self.headings = [], [], [], []
        self.external = []  # anything that would need the network
        self._cell, self._row, self._heading = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href"):
            if attrs.get(name, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[name])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag in ("h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self.tables:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag in ("h2", "h3"):
            self.headings.append(self._heading.strip())
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data


def parse(path):
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def assert_self_contained(path, page):
    """Every image a decodable PNG inside the page, every link an existing file."""
    assert page.external == []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_SIGNATURE)
    for href in page.links:
        target = urlparse(href)
        assert target.scheme in ("", "file"), href
        assert (Path(path).parent / unquote(target.path)).resolve().is_file(), href


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from mirage.report.study_outputs import write_study
    root = tmp_path_factory.mktemp("report")
    datasets, output, runs = make_grid(root)
    files = write_study([output], root / "study", quiet=True, run_reports="missing")
    return root, runs, files


def test_run_report_shows_the_run_its_scores_curves_and_gallery(study):
    _, runs, _ = study
    run_dir = runs[("MIRAGE-Tiny", 1)]
    page = parse(run_dir / "report.html")
    assert_self_contained(run_dir / "report.html", page)
    assert page.headings[:5] == ["Run", "Test scores: Synth_OCT", "Layer boundaries",
                                 "Best, median and worst B-scans by Dice", "Training"]
    assert "Configuration (config.yaml)" in page.headings
    # box plots, boundary box plot, 3 gallery overlays, training curves, per-class
    # validation IoU
    assert len(page.images) == 7
    scores = {row[0]: row for row in page.tables[1][1:]}
    assert page.tables[1][0] == ["class", "volumes", "Dice (%)", "IoU (%)", "HD95 (px)",
                                 "Dice 95% CI", "IoU 95% CI", "HD95 95% CI"]
    rows = pd.concat([pd.read_csv(p, dtype={"ID": str})
                      for p in sorted(run_dir.glob("results*.csv"))])
    for label in ("ILM-NFL", "Fluid"):
        assert scores[label][2] == f"{100 * rows[rows['Class'] == label]['Dice'].mean():.2f}"
    assert scores["[all]"][2] == f"{100 * rows['Dice'].mean():.2f}"
    assert scores["[layers]"][1] == "6"
    config = {row[0]: row[1] for row in page.tables[-1][1:]}
    assert config["seed"] == "1" and config["loss"] == "CEGDice"
    text = (run_dir / "report.html").read_text()
    assert "best of 12 B-scans" in text and "worst of 12 B-scans" in text


def test_grid_report_tables_heat_maps_and_links(study):
    root, runs, files = study
    report = files["report.html"]
    page = parse(report)
    assert_self_contained(report, page)
    assert page.headings[:3] == ["Overview", "Heat map of mean Dice", "Tables"]
    # Dice heat maps: all classes, layers, lesions; the boundary box plot
    assert len(page.images) == 4
    # every run's report and every output file is linked
    linked = {(report.parent / unquote(h)).resolve() for h in page.links}
    assert {(runs[k] / "report.html").resolve() for k in runs} <= linked
    for name in ("summary.csv", "summary.md", "summary.tex", "significance.csv", "runs.csv"):
        assert (report.parent / name).resolve() in linked
    summary = pd.read_csv(files["summary.csv"])
    dice_all = [t for t in page.tables if t[0] == ["model", "Synth_OCT"]][0]
    for model in MODELS:
        row = summary[(summary["model"] == model) & (summary["class"] == "[all]")].iloc[0]
        cell = f"{row['Dice_mean']:.2f} ± {row['Dice_std']:.2f}"
        assert [model, cell] in dice_all[1:]
    best = summary[(summary["model"] == "MIRAGE-Tiny") & (summary["class"] == "[all]")]
    assert f'<td class="best">{best["Dice_mean"].iloc[0]:.2f} ±' in report.read_text()


def test_run_reports_never_replace_a_user_file(study, tmp_path):
    from mirage.errors import UserError
    from mirage.report.run_report import write_run_report
    from mirage.report.study_outputs import write_study
    root, runs, _ = study
    run_dir = tmp_path / "run"
    shutil.copytree(runs[("RETFound-Tiny", 2)], run_dir)
    (run_dir / "report.html").write_text("<html>my notes</html>")
    with pytest.raises(UserError, match="not written by this tool"):
        write_run_report(run_dir)
    files = write_study([run_dir], tmp_path / "s", quiet=True, run_reports="all")
    assert (run_dir / "report.html").read_text() == "<html>my notes</html>"
    assert "was not written by this tool; left alone" in files["report.html"].read_text()
    links = parse(files["report.html"]).links
    assert not any(link.endswith("run/report.html") for link in links)  # not ours: no link


def test_eval_writes_the_report_and_report_only_rewrites_it(study, tmp_path, capsys):
    import run_seg_eval
    root, runs, _ = study
    run_dir = tmp_path / "Synth_OCT" / "run_s1"
    shutil.copytree(runs[("MIRAGE-Tiny", 2)], run_dir)
    for name in ("report.html", "results_layers.csv", "results_lesions.csv"):
        (run_dir / name).unlink()
    run_seg_eval.main(["-m", str(run_dir), "-d", str(root / "datasets")])
    assert f"wrote {run_dir / 'report.html'}" in capsys.readouterr().out
    page = parse(run_dir / "report.html")
    assert len(page.images) == 7
    record = json.loads((run_dir / "evaluation.json").read_text())
    assert record["Synth_OCT"]["empty_volume"] == "zero"
    (run_dir / "report.html").unlink()
    run_seg_eval.main(["-m", str(run_dir), "--report_only", "-d", str(tmp_path / "nowhere")])
    page = parse(run_dir / "report.html")
    assert len(page.images) == 7  # the datasets folder recorded at evaluation is used


def test_report_of_an_unevaluated_run_says_so(study, tmp_path):
    from mirage.report.run_report import write_run_report
    root, runs, _ = study
    run_dir = tmp_path / "Synth_OCT" / "untested"
    run_dir.mkdir(parents=True)
    for name in ("config.yaml", "log.txt"):
        shutil.copy(runs[("MIRAGE-Tiny", 1)] / name, run_dir / name)
    page = parse(write_run_report(run_dir))
    assert page.headings[:2] == ["Run", "Test scores"]
    assert len(page.images) == 2  # the training curves only
    assert "not evaluated: no preds/" in (run_dir / "report.html").read_text()


def test_tensorboard_event_files_hold_the_log(study):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, runs, _ = study
    folder = runs[("MIRAGE-Tiny", 1)] / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    log = [json.loads(line) for line in
           (runs[("MIRAGE-Tiny", 1)] / "log.txt").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [entry["epoch"] for entry in log if "epoch" in entry]
    assert [e.value for e in loss] == pytest.approx(
        [entry["train/loss"] for entry in log if "epoch" in entry])
    assert events.Scalars("val/IoU/Fluid")[0].value == pytest.approx(log[0]["val/IoU"]["Fluid"])
    assert events.Scalars("test/mIoU")[0].step == 2
