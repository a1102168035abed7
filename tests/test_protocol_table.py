"""A models x protocols study: run_seg_report.py --columns tuning.

2 models x 3 tuning protocols x 2 seeds, fabricated as run_seg_tuning.py leaves them: the
options resolved by mirage.config.parse_config from a real command line, identity.json,
folder name and config.yaml as mirage.run.identity and the training loop write them, then
predictions, the real evaluation and the study. Expected cells are recomputed here from the
results CSVs with plain pandas (mean over a run's rows, then mean and sample std over the
seeds), and the best of each column is picked here, from those numbers.
"""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mirage.config import parse_config, yaml_text
from mirage.data.layout import open_dataset
from mirage.data.synthetic import write_synthetic_dataset
from mirage.evaluate.outputs import evaluate_runs
from mirage.run.identity import legacy_run_name, run_directory, run_identity

from test_study import DATASET, summarise, write_run_outputs

MODELS = ("MIRAGE-Tiny", "RETFound-Tiny")
TUNINGS = ("frozen", "linear_probe", "lora")
WORDS = {"frozen": "frozen (paper)", "fully_frozen": "fully frozen",
         "linear_probe": "linear probe", "lora": "LoRA r8", "full": "full fine-tuning"}
SEEDS = (1, 2)
# Rows the predictions are off by: the better model differs between protocols, so the
# bold cell of each column is not always in the same row.
SHIFTS = {("MIRAGE-Tiny", "frozen"): 1, ("RETFound-Tiny", "frozen"): 3,
          ("MIRAGE-Tiny", "linear_probe"): 5, ("RETFound-Tiny", "linear_probe"): 2,
          ("MIRAGE-Tiny", "lora"): 0, ("RETFound-Tiny", "lora"): 4,
          ("MIRAGE-Tiny", "full"): 2, ("RETFound-Tiny", "full"): 1,
          ("MIRAGE-Tiny", "fully_frozen"): 3, ("RETFound-Tiny", "fully_frozen"): 6}


def train_run(root, model, tuning, seed, shift, legacy=False):
    """One run directory as `run_seg_tuning.py --weights <model>.pth --tuning <tuning>
    --seed <seed>` (then --infer_only --test) leaves it; ``legacy``: as a version before
    --tuning wrote it (no tuning or LoRA options in config.yaml, the older folder name,
    the older option instead of --tuning on its command line)."""
    weights = root / "weights" / f"{model}.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(model.encode())
    data_path = root / "datasets" / DATASET
    protocol = ["--tuning", tuning]
    if legacy:
        protocol = {"frozen": ["--freeze_encoder"], "full": ["--no_freeze_encoder"],
                    "fully_frozen": ["--freeze_patch_embed"],
                    "linear_probe": ["--freeze_patch_embed", "--output_adapter", "linear"],
                    }[tuning]
    argv = ["--weights", str(weights), "--data_path", str(data_path), "--seed", str(seed),
            "--loss", "CEGDice", "--epochs", "3", "--base_output_dir",
            str(root / "output"), "--version", "v1", *protocol]
    config, _, _ = parse_config(argv)
    assert config["tuning"] == tuning
    dataset = open_dataset(data_path)
    identity = run_identity(config, dataset)
    run_dir = run_directory(config, dataset, identity)
    text = yaml_text(config)
    if legacy:
        run_dir = run_dir.parent / legacy_run_name(config, identity)
        old = {k: v for k, v in yaml.safe_load(text).items()
               if k != "tuning" and not k.startswith("lora_")}
        text = yaml.safe_dump(old, sort_keys=False)
        assert "tuning" not in identity
    run_dir.mkdir(parents=True)
    (run_dir / "identity.json").write_text(json.dumps(identity))
    (run_dir / "config.yaml").write_text(text)
    write_run_outputs(run_dir, data_path, seed, shift, f"{model} {tuning} {seed}")
    return run_dir


def make_protocol_grid(root, tunings=TUNINGS, legacy=False):
    """datasets/Synth_OCT and a models x protocols x seeds grid under output/, evaluated."""
    root = Path(root)
    write_synthetic_dataset(root / "datasets", name=DATASET, splits={"test": 4},
                            slices_per_volume=2, size=(48, 64), seed=3)
    runs = {(model, tuning, seed): train_run(root, model, tuning, seed,
                                             SHIFTS[(model, tuning)], legacy=legacy)
            for model in MODELS for tuning in tunings for seed in SEEDS}
    evaluate_runs(list(runs.values()), root / "datasets", quiet=True)
    return root / "output", runs


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return make_protocol_grid(tmp_path_factory.mktemp("protocols"))


def expected_cells(runs, tunings=TUNINGS, metric="Dice"):
    """{(model, tuning): (mean, std)} over the seeds of each run's mean over every
    (volume, class) row of its results CSVs (Dice in %), by hand."""
    cells = {}
    for model in MODELS:
        for tuning in tunings:
            per_seed = []
            for seed in SEEDS:
                rows = pd.concat([pd.read_csv(p) for p in
                                  sorted(runs[(model, tuning, seed)].glob("results*.csv"))])
                scale = 100 if metric == "Dice" else 1
                per_seed.append(scale * rows[metric].mean())
            cells[(model, tuning)] = (np.mean(per_seed), np.std(per_seed, ddof=1))
    return cells


def section(md, title):
    """The lines of summary.md's table under ``## title``."""
    text = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in text.splitlines() if line.startswith("|")]


def expected_table(cells, tunings=TUNINGS, lower_is_better=False):
    """The Markdown table's lines: models as rows, protocols as columns, the best of each
    column (as printed) in bold."""
    lines = ["| model | " + " | ".join(WORDS[t] for t in tunings) + " |",
             "|:--|" + "--:|" * len(tunings)]
    best = {}
    for tuning in tunings:
        printed = {model: round(cells[(model, tuning)][0], 2) for model in MODELS}
        pick = min if lower_is_better else max
        best[tuning] = {m for m, v in printed.items() if v == pick(printed.values())}
    for model in MODELS:
        texts = []
        for tuning in tunings:
            mean, std = cells[(model, tuning)]
            text = f"{mean:.2f} ± {std:.2f}"
            texts.append(f"**{text}**" if model in best[tuning] else text)
        lines.append(f"| {model} | " + " | ".join(texts) + " |")
    return lines


# ----------------------------------------------------------------------------- the study
def test_the_runs_are_named_and_recorded_as_run_seg_tuning_py_writes_them(grid):
    _, runs = grid
    for (model, tuning, seed), run in runs.items():
        decoder = "linear" if tuning == "linear_probe" else "convnext"
        assert re.fullmatch(rf"{model}_{tuning}_{decoder}_CEGDice_s{seed}_[0-9a-f]{{8}}",
                            run.name)
        config = yaml.safe_load((run / "config.yaml").read_text())
        identity = json.loads((run / "identity.json").read_text())
        assert config["tuning"] == tuning
        assert ("tuning" in identity) == ("lora_rank" in identity) == (tuning == "lora")


def test_models_are_rows_and_protocols_are_columns(grid, tmp_path):
    output, runs = grid
    files = summarise([output], tmp_path / "study", columns="tuning")
    md = files["summary.md"].read_text()
    # one table per metric and class group (one dataset): 2 models x 3 protocols
    assert md.count("| model | frozen (paper) | linear probe | LoRA r8 |") == 6
    table = section(md, f"Dice (%), all scored classes, {DATASET}")
    cells = expected_cells(runs)
    assert table == expected_table(cells)
    # the better model differs between the columns (the bold is per column)
    assert {max(MODELS, key=lambda m: cells[(m, t)][0]) for t in TUNINGS} == set(MODELS)
    hd95 = section(md, f"HD95 (px), all scored classes, {DATASET}")
    assert hd95 == expected_table(expected_cells(runs, metric="HD95"), lower_is_better=True)
    # summary.csv says each group's protocol: its name, its words and its row
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    totals = summary[summary["class"] == "[all]"]
    assert sorted(zip(totals["model"], totals["tuning"], totals["tuning_label"],
                      totals["model_label"], totals["label"])) == sorted(
        (m, t, WORDS[t], m, f"{m}, {WORDS[t]}") for m in MODELS for t in TUNINGS)
    for _, row in totals.iterrows():
        mean, std = cells[(row["model"], row["tuning"])]
        assert float(row["Dice_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["Dice_std"]) == pytest.approx(std, abs=1e-9)
    assert set(totals.loc[totals["tuning"] == "linear_probe", "decoder"]) == {"linear"}


def test_latex_and_html_show_the_same_layout(grid, tmp_path):
    output, runs = grid
    files = summarise([output], tmp_path / "study", columns="tuning")
    cells = expected_cells(runs)
    tex = files["summary.tex"].read_text()
    assert tex.count("Model & frozen (paper) & linear probe & LoRA r8 \\\\") == 6
    assert "\\caption{Dice (\\%), all scored classes, Synth\\_OCT: mean $\\pm$" in tex
    page = files["report.html"].read_text()
    html = page.split("<h3>Dice (%), all scored classes, Synth_OCT</h3>", 1)[1]
    html = html.split("</table>", 1)[0]
    assert "".join(f'<th class="">{WORDS[t]}</th>' for t in TUNINGS) in html
    tex_rows = tex.split("Model & frozen (paper)", 1)[1].split("\\bottomrule", 1)[0]
    for model in MODELS:
        tex_cells, html_cells = [], []
        for tuning in TUNINGS:
            mean, std = cells[(model, tuning)]
            best = max(round(cells[(m, tuning)][0], 2) for m in MODELS)
            text = f"{mean:.2f} ± {std:.2f}"
            bold = round(mean, 2) == best
            tex_text = text.replace("±", "$\\pm$")
            tex_cells.append(f"\\textbf{{{tex_text}}}" if bold else tex_text)
            html_cells.append(f'<td class="best">{text}</td>' if bold else f"<td>{text}</td>")
        assert f"{model} & " + " & ".join(tex_cells) + " \\\\" in tex_rows
        assert f'<td class="text">{model}</td>' + "".join(html_cells) in html
    assert "model x protocol" in page


def test_the_default_layout_keeps_datasets_as_columns_with_the_protocol_in_the_label(
        grid, tmp_path):
    output, runs = grid
    md = summarise([output], tmp_path / "study")["summary.md"].read_text()
    assert md.count(f"| model | {DATASET} |") == 6
    table = section(md, "Dice (%), all scored classes")
    labels = [line.split(" | ")[0][2:] for line in table[2:]]
    assert labels == sorted(f"{m}, {WORDS[t]}" for m in MODELS for t in TUNINGS)


def test_older_runs_without_tuning_land_in_their_protocol_column(tmp_path):
    tunings = ("frozen", "fully_frozen", "linear_probe", "full")
    output, runs = make_protocol_grid(tmp_path, tunings, legacy=True)
    names = {run.name for run in runs.values()}
    assert any("_frozen_linear_CEGDice_fullyfrozen_s1_" in name for name in names)
    assert any(name.startswith("MIRAGE-Tiny_convnext_CEGDice_s1_") for name in names)
    for run in runs.values():
        assert "tuning" not in yaml.safe_load((run / "config.yaml").read_text())
    files = summarise([output], tmp_path / "study", columns="tuning")
    md = files["summary.md"].read_text()
    table = section(md, f"Dice (%), all scored classes, {DATASET}")
    assert table == expected_table(expected_cells(runs, tunings), tunings)
    summary = pd.read_csv(files["summary.csv"], keep_default_na=False)
    assert set(summary["tuning"]) == set(tunings)


def test_the_command_line_writes_the_table_by_protocol(grid, tmp_path, capsys):
    import run_seg_report
    output, runs = grid
    run_seg_report.main([str(output), "-o", str(tmp_path / "cli"), "--run_reports", "none",
                         "--columns", "tuning"])
    printed = capsys.readouterr().out
    expected = expected_table(expected_cells(runs))
    assert "\n".join(expected) in printed
    md = (tmp_path / "cli" / "summary.md").read_text()
    assert section(md, f"Dice (%), all scored classes, {DATASET}") == expected
    with pytest.raises(SystemExit) as exit_info:
        run_seg_report.main([str(output), "-o", str(tmp_path / "x"), "--columns", "seed"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- in memory
def _run(model, seed, tuning="frozen", dataset="D1", dice=0.8, **options):
    """An evaluated Run in memory: its config.yaml and identity.json as run_seg_tuning.py
    writes them for ``tuning`` (the LoRA options in the identity only for lora)."""
    from mirage.run.catalog import Run
    from mirage.run.results import Evaluation
    from mirage.options import LORA_OPTIONS, OPTION_BY_NAME
    from mirage.protocol import alias_values
    rows = pd.DataFrame([("v1", "Layer", "layers", dice, dice, 1.0)],
                        columns=["ID", "Class", "Group", "Dice", "IoU", "HD95"])
    lora = {name: options.get(name, OPTION_BY_NAME[name].default) for name in LORA_OPTIONS}
    other = {k: v for k, v in options.items() if k not in LORA_OPTIONS}  # e.g. lr
    freeze_encoder, freeze_patch_embed = alias_values(tuning)
    decoder = "linear" if tuning == "linear_probe" else "convnext"
    config = {"seed": seed, "weights": f"/w/{model}.pth", "output_adapter": decoder,
              "loss": "CE", "tuning": tuning, "freeze_encoder": freeze_encoder,
              "freeze_patch_embed": freeze_patch_embed, **lora, **other}
    identity = {"seed": seed, "weights_name": f"{model}.pth", "output_adapter": decoder,
                "freeze_encoder": freeze_encoder, "freeze_patch_embed": freeze_patch_embed,
                **other,
                **({"tuning": tuning, **lora} if tuning == "lora" else {})}
    key = "_".join(f"{k}{v}" for k, v in sorted(options.items()))
    run = Run(path=Path(f"/s/v1/{dataset}/{model}_{tuning}{key}_{seed}"), config=config,
              identity=identity, status="evaluated")
    run.evaluations = [Evaluation(dataset=dataset, external="", rows=rows, files=[],
                                  empty_volume="zero")]
    return run


def _tables(runs, labels=None, metric="Dice"):
    from mirage.report.study import build_study, summary_table
    from mirage.report.tables import paper_tables
    study = build_study(runs, labels)
    return study, paper_tables(summary_table(study), (metric,), columns="tuning")


def test_a_lora_variant_is_a_column_of_its_own_after_the_default_rank():
    runs = [_run(m, 1, "frozen") for m in "AB"]
    runs += [_run(m, 1, "lora", dice=0.7) for m in "AB"]
    runs += [_run("A", 1, "lora", dice=0.9, lora_rank=16), _run("A", 1, "full", dice=0.6)]
    study, tables = _tables(runs)
    table = tables[0]
    assert table.columns == ["frozen (paper)", "LoRA r8", "LoRA r16", "full fine-tuning"]
    assert table.labels == ["A", "B"] and table.dataset == "D1"
    assert table.text("A", "LoRA r16") == "90.00" and table.text("B", "LoRA r16") == ""
    assert sorted(g.label for g in study.groups) == [
        "A, LoRA r16", "A, LoRA r8", "A, frozen (paper)", "A, full fine-tuning",
        "B, LoRA r8", "B, frozen (paper)"]


def test_lora_options_other_than_the_rank_are_said_where_not_the_default():
    runs = [_run("A", 1, "lora"), _run("A", 1, "lora", lora_alpha=32.0),
            _run("A", 1, "lora", lora_targets="qkv-proj-fc1-fc2")]
    study, tables = _tables(runs)
    # each option not the default somewhere is said for every LoRA group
    assert tables[0].columns == ["LoRA r8 alpha 16 on qkv-proj",
                                 "LoRA r8 alpha 16 on qkv-proj-fc1-fc2",
                                 "LoRA r8 alpha 32 on qkv-proj"]
    assert tables[0].labels == ["A"]
    # one protocol only in the study: the labels need not say it, the columns do
    runs = [_run(m, s, "lora") for m in "AB" for s in (1, 2)]
    study, tables = _tables(runs)
    assert sorted(g.label for g in study.groups) == ["A", "B"]
    assert tables[0].columns == ["LoRA r8"]


def test_several_datasets_give_one_table_each_and_the_best_is_per_column():
    runs = [_run("A", 1, "frozen", "D1", 0.8), _run("B", 1, "frozen", "D1", 0.7),
            _run("A", 1, "full", "D1", 0.5), _run("B", 1, "full", "D1", 0.6),
            _run("A", 1, "frozen", "D2", 0.4), _run("B", 1, "full", "D2", 0.3)]
    _, tables = _tables(runs)
    assert [(t.class_group, t.dataset) for t in tables] == [
        ("all", "D1"), ("all", "D2"), ("layers", "D1"), ("layers", "D2")]
    tables = tables[:2]
    assert [t.title for t in tables] == ["Dice (%), all scored classes, D1",
                                         "Dice (%), all scored classes, D2"]
    d1, d2 = tables
    assert d1.best("frozen (paper)") == {"A"} and d1.best("full fine-tuning") == {"B"}
    assert d2.columns == ["frozen (paper)", "full fine-tuning"]
    assert d2.text("B", "frozen (paper)") == "" and d2.text("A", "full fine-tuning") == ""


def test_user_labels_name_a_row_of_every_protocol():
    runs = [_run("A", 1, "frozen"), _run("A", 1, "full"), _run("B", 1, "frozen")]
    study, tables = _tables(runs, {"A.pth": "Ours", "B": "Baseline"})
    assert tables[0].labels == ["Baseline", "Ours"]
    assert sorted(g.label for g in study.groups) == [
        "Baseline, frozen (paper)", "Ours, frozen (paper)", "Ours, full fine-tuning"]
    # the automatic label without its protocol names the row of every protocol
    runs = [_run("A", 1, "frozen", lr=1e-3), _run("A", 1, "full", lr=1e-3),
            _run("A", 1, "frozen", lr=1e-4)]
    study, tables = _tables(runs, {"A, lr 1e-3": "Ours"})
    assert tables[0].labels == ["A, lr 1e-4", "Ours"]
    assert sorted(g.label for g in study.groups) == [
        "A, lr 1e-4, frozen (paper)", "Ours, frozen (paper)", "Ours, full fine-tuning"]
    assert tables[0].text("Ours", "full fine-tuning") == "80.00"
