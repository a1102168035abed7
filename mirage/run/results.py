"""A run's results CSV files and evaluation.json, read back as scores.

    read_evaluations(folder, notes)      -> [Evaluation, ...] (one per evaluated dataset)
    read_results_csv(path)               -> (DataFrame, problem text)
    record_evaluation(evaluation, ...)   -> writes <run>/evaluation.json (run_seg_eval.py)

Scores are kept as the CSV files hold them: Dice and IoU as fractions, HD95 in pixels.
What cannot be read becomes a note, never an exception. Results files written before the
pixel counts existed (only ID, Class, Dice, IoU, HD95) are read with the counts unknown
(NaN) and nothing flagged as missed, and a note says so.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.data.classes import LESION_LABELS
from mirage.run import METRICS
from mirage.run.folder import RunFolder

# After ID, Class and the METRICS, each results row holds the class's pixels in the volume's
# truth and prediction, and whether it was missed (in the truth, never predicted). They
# come last so that readers of the first five columns keep working.
COUNT_COLUMNS = ("truth_pixels", "pred_pixels")
MISSED = "missed"
HD95_MISSING_DEFAULT = "original"  # the only rule before run_seg_eval.py --hd95_missing


@dataclass
class Evaluation:
    """One dataset's scores of a run, read back from its results CSV file(s).

    rows: DataFrame with ID (str), Class, Group ("layers" or "lesions"), Dice, IoU, HD95,
    truth_pixels, pred_pixels (NaN in older files), missed (bool).
    empty_volume: the --empty_volume mode ("zero", "nan"), or "" when not known.
    """

    dataset: str
    external: str
    rows: pd.DataFrame
    files: list
    empty_volume: str = ""
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def classes(self):
        return tuple(sorted(self.rows["Class"].unique()))

    def kinds(self):
        """The class groups present: "layers" and/or "lesions"."""
        return [g for g in ("layers", "lesions") if (self.rows["Group"] == g).any()]

    def group_rows(self, group):
        return self.rows if group == "all" else self.rows[self.rows["Group"] == group]

    @property
    def hd95_missing(self):
        """The --hd95_missing rule the files were scored with (older runs: "original")."""
        return str(self.options.get("hd95_missing") or HD95_MISSING_DEFAULT)

    @property
    def counts_known(self):
        """False for results files written before the pixel counts (nothing can be flagged)."""
        return "truth_pixels" in self.rows and bool(self.rows["truth_pixels"].notna().all())


def _split_results_name(stem):
    """'results_lesions_Duke_iAMD' -> ('lesions', 'Duke_iAMD'); 'results' -> ('all', '')."""
    rest = stem[len("results"):]
    for group in ("layers", "lesions"):
        tag = f"_{group}"
        if rest == tag or rest.startswith(tag + "_"):
            return group, rest[len(tag) + 1:]
    if rest == "":
        return "all", ""
    return ("all", rest[1:]) if rest.startswith("_") else (None, None)


def read_evaluations(run_dir, notes, dataset=None):
    """Every results*.csv of a run, one Evaluation per evaluated dataset (``dataset``:
    the run's own test set, default the name of the folder's parent)."""
    folder = RunFolder(run_dir)
    run_dir = folder.path
    record = folder.read_evaluation_record(notes)
    files = {}
    for path in folder.results_files():
        group, external = _split_results_name(path.stem)
        known = external == "" or folder.preds_dir(external).is_dir() or external in record
        if group is None or not known:
            notes.append(f"{path.name}: not a results file of run_seg_eval.py (no "
                         f"preds_{external}/); ignored")
            continue
        files.setdefault(external, {})[group] = path
    evaluations = []
    for external, by_group in files.items():
        if "all" in by_group and len(by_group) > 1:
            # A dataset evaluated once with one class group and once with two: keep the newer.
            newest = max(by_group.values(), key=lambda p: p.stat().st_mtime)
            keep = {"all": by_group["all"]} if newest == by_group["all"] else \
                {g: p for g, p in by_group.items() if g != "all"}
            dropped = sorted(p.name for g, p in by_group.items() if g not in keep)
            notes.append(f"both results.csv and per-group files for "
                         f"{external or 'the test set'}; using the newer, ignoring "
                         f"{', '.join(dropped)}")
            by_group = keep
        scored = external or dataset or run_dir.parent.name
        evaluation = _read_results(scored, external, by_group, record.get(scored, {}), notes)
        if evaluation is not None:
            _note_stale(run_dir, evaluation, notes)
            evaluations.append(evaluation)
    return evaluations


def _read_results(dataset, external, by_group, options, notes):
    frames, problems = [], []
    for group, path in sorted(by_group.items()):
        frame, problem = read_results_csv(path)
        if problem:
            problems.append(problem)
            continue
        if group == "all":
            lesion = frame["Class"].str.strip().str.lower().isin(LESION_LABELS)
            frame["Group"] = np.where(lesion, "lesions", "layers")
        else:
            frame["Group"] = group
        frames.append(frame)
    notes.extend(problems)
    if problems or not frames:
        return None
    rows = pd.concat(frames, ignore_index=True)
    evaluation = Evaluation(dataset=dataset, external=external, rows=rows,
                            files=sorted(by_group.values()), options=dict(options))
    if not evaluation.counts_known:
        notes.append(f"{dataset}: results files without pixel counts (older run_seg_eval.py): "
                     "classes never predicted cannot be flagged; re-run run_seg_eval.py")
    if isinstance(options, dict) and options.get("note"):
        notes.append(f"{dataset}: {options['note']}")  # e.g. foreign predictions
    mode = options.get("empty_volume") if isinstance(options, dict) else None
    if mode in ("zero", "nan"):
        evaluation.empty_volume = mode
    elif rows["Dice"].isna().any():
        evaluation.empty_volume = "nan"  # --empty_volume zero never gives a NaN Dice
    return evaluation


def read_results_csv(path):
    """(DataFrame ID, Class, Dice, IoU, HD95, truth_pixels, pred_pixels, missed, then any
    later numeric metric column such as HD95_um; problem text or "") of one results file.
    Older files without the counts and missed read as NaN counts and nothing missed.

    Lines starting with '#' before the header are comments (kept out of the table).
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"ID": str, "Class": str}, comment=None,
                            skiprows=_comment_lines(path), keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        return None, f"{path.name}: unreadable ({str(err).splitlines()[0]}); ignored"
    missing = [c for c in ("ID", "Class", *METRICS) if c not in frame.columns]
    if missing:
        return None, f"{path.name}: no column {', '.join(missing)}; ignored"
    if frame.empty:
        return None, f"{path.name}: no rows; ignored"
    for column in COUNT_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    if MISSED not in frame.columns:
        frame[MISSED] = False
    # Later metrics after these (HD95_um, ASSD_um where a spacing was known): every other
    # numeric column, kept for the summaries (text columns such as spacing_um are not).
    known = ("ID", "Class", *METRICS, *COUNT_COLUMNS, MISSED)
    later = [c for c in frame.columns if c not in known and frame[c].dtype.kind in "fiu"]
    frame = frame[[*known, *later]].copy()
    for metric in (*METRICS, *COUNT_COLUMNS):
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype(float)
    frame[MISSED] = frame[MISSED].astype(str).str.strip().str.lower().isin(("true", "1"))
    frame[["ID", "Class"]] = frame[["ID", "Class"]].astype(str)
    return frame, ""


def _comment_lines(path):
    count = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            count += 1
    return count


def _note_stale(run_dir, evaluation, notes):
    preds = RunFolder(run_dir).preds_dir(evaluation.external)
    if preds.is_dir():
        newest_result = min(p.stat().st_mtime for p in evaluation.files)
        if preds.stat().st_mtime > newest_result + 1:
            names = ", ".join(p.name for p in evaluation.files)
            notes.append(f"{preds.name}/ is newer than {names}: re-run run_seg_eval.py")


def missed_counts(rows):
    """{class label: (volumes where it was missed, volumes whose truth holds it)} of the
    classes missed at least once, in the order of ``rows`` (results rows; {} for rows
    without the missed flag)."""
    if MISSED not in rows or "truth_pixels" not in rows:
        return {}
    missed = rows[rows[MISSED].astype(bool)]
    counts = {}
    for label in dict.fromkeys(missed["Class"]):
        of_class = rows[rows["Class"] == label]
        holding = int((of_class["truth_pixels"] > 0).sum())
        counts[label] = (int(of_class[MISSED].astype(bool).sum()), holding)
    return counts


def missed_text(counts):
    """'Fluid never predicted in 8 of 8 volumes that hold it; ...' for missed_counts."""
    return "; ".join(f"{label} never predicted in {n} of {holding} volume(s) that hold it"
                     for label, (n, holding) in counts.items())


def record_evaluation(evaluation, **options):
    """Note in ``<run>/evaluation.json`` how ``evaluation`` (a mirage.evaluate.scoring
    RunEvaluation) was scored, so summaries can tell runs scored differently apart."""
    entry = {key: value for key, value in options.items()
             if value is None or isinstance(value, (str, int, float, bool))}
    entry.update(external=evaluation.external,
                 files=[Path(p).name for p in evaluation.files],
                 volumes=int(evaluation.rows["ID"].nunique()),
                 classes=sorted(map(str, evaluation.rows["Class"].unique())),
                 missed={label: n for label, (n, _) in missed_counts(evaluation.rows).items()})
    return RunFolder(evaluation.run_dir).record_evaluation(evaluation.dataset, entry)

