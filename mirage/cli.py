"""Entry points of the three command-line tools.

``run_seg_tuning.py`` -> :func:`tune`, ``run_seg_eval.py`` -> :func:`evaluate`, ``./runner``
-> :func:`mirage.grid.runner.main`; the console scripts ``run_seg_tuning``, ``run_seg_eval``
and ``mirage_runner`` that ``pip install .`` puts on the PATH (pyproject.toml) call the same.
These functions and mirage.demo are the only places that chain stages: training is
followed by TensorBoard curves, scoring by the run's report.html.

Only the option parsers are imported up front: torch, timm, OpenCV and pandas load once
the options are read, so ``-h`` answers at once and a bad option fails fast.
"""
import argparse

from mirage.config import parse_config
from mirage.errors import exit_on_user_error

from mirage.evaluate import EMPTY_VOLUME_MODES  # a constant: imports nothing heavy


@exit_on_user_error
def tune(argv=None):
    """Train, test or predict one run (``run_seg_tuning.py``); ``--demo`` runs the demo."""
    config, run_demo, _ = parse_config(argv)
    if run_demo:
        from mirage import demo  # deferred (here and below): torch, timm, OpenCV, pandas
        return demo.run(config)
    from mirage.report.tensorboard_log import write_tensorboard  # deferred
    from mirage.train import job  # deferred
    # Training is followed by the run's TensorBoard curves after every epoch.
    return job.main(config, on_epoch_end=write_tensorboard)


def eval_parser():
    """The options of ``run_seg_eval.py``."""
    parser = argparse.ArgumentParser(
        prog="run_seg_eval.py",
        description="Per-volume Dice, IoU and HD95 of a run's test predictions.")
    parser.add_argument("-d", "--datasets_path", default="./__datasets/Segmentation/",
                        help="folder holding the datasets (default: %(default)s)")
    parser.add_argument("-m", "--model_path", nargs="+", required=True, metavar="RUN_DIR",
                        help="run directory <output>/<version>/<dataset>/<run name>/; "
                             "several for a summary table")
    parser.add_argument("-e", "--external", metavar="NAME", default=None,
                        help="evaluate preds_NAME/ against dataset NAME (masks in "
                             "NAME/test/semseg or NAME/semseg)")
    parser.add_argument("--ignore_bg", dest="ignore_bg", action="store_true", default=True,
                        help="do not score background-like classes (bg, background, "
                             "above ilm) (default)")
    parser.add_argument("--no_ignore_bg", dest="ignore_bg", action="store_false",
                        help="score background-like classes too")
    parser.add_argument("--empty_sets_nan", dest="empty_sets_nan", action="store_true",
                        default=True,
                        help="HD95 of a B-scan where exactly one mask is empty is NaN and "
                             "left out of the volume mean (default)")
    parser.add_argument("--no_empty_sets_nan", dest="empty_sets_nan", action="store_false",
                        help="... is the image diagonal sqrt(H^2 + W^2) instead")
    parser.add_argument("--empty_volume", choices=EMPTY_VOLUME_MODES, default="zero",
                        help="a class absent from both the volume's truth and prediction: "
                             "Dice = IoU = 0 as the original tool (zero, default) or left "
                             "out of the means (nan)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes scoring B-scans in parallel (default: %(default)s)")
    parser.add_argument("--summary", metavar="CSV", default=None,
                        help="also write one row per run and class group (mean ± std) here")
    parser.add_argument("--foreign_predictions", action="store_true",
                        help="score predictions without a manifest of this run's best "
                             "checkpoint (e.g. made by another tool); noted in the output")
    parser.add_argument("--no_report", dest="report", action="store_false",
                        help="do not write report.html into each run directory")
    parser.add_argument("--report_only", action="store_true",
                        help="only (re)write each run's report.html from its results "
                             "CSVs; nothing is scored")
    return parser


@exit_on_user_error
def evaluate(argv=None):
    """Score the test predictions of one or more runs (``run_seg_eval.py``)."""
    args = eval_parser().parse_args(argv)
    if args.report_only:
        from mirage.report.run_report import write_run_report  # deferred: matplotlib
        paths = [write_run_report(path, args.datasets_path) for path in args.model_path]
        print("\n".join(f"wrote {path}" for path in paths))
        return paths
    from mirage.evaluate.outputs import evaluate_runs  # deferred: pandas, OpenCV, SciPy

    def write_report(evaluation):  # scoring is followed by the run's report.html
        from mirage.report.run_report import write_run_report  # deferred: matplotlib
        path = write_run_report(evaluation.run_dir, args.datasets_path, quiet=False)
        print(f"wrote {path}")

    return evaluate_runs(args.model_path, args.datasets_path, external=args.external,
                         ignore_bg=args.ignore_bg, empty_sets_nan=args.empty_sets_nan,
                         empty_volume=args.empty_volume, workers=args.workers,
                         summary=args.summary, foreign_predictions=args.foreign_predictions,
                         on_scored=write_report if args.report else None)


# Console scripts exit with their function's return value: these return None (status 0);
# errors exit with status 2 through exit_on_user_error.
def tune_command():
    tune()


def evaluate_command():
    evaluate()
