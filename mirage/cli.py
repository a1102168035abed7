"""Entry points of run_seg_tuning.py, run_seg_eval.py (and eval_seg.py) and ./runner.

``run_seg_tuning.py`` -> :func:`tune`, ``run_seg_eval.py`` -> :func:`evaluate`, ``./runner``
-> :func:`mirage.grid.runner.main`; the console scripts ``run_seg_tuning``, ``run_seg_eval``
and ``mirage_runner`` that ``pip install .`` puts on the PATH (pyproject.toml) call the same.
These functions and mirage.demo are the only places that chain stages: training is
followed by TensorBoard curves, scoring by the run's report.html.

Only the option parsers are imported up front: torch, timm, OpenCV and pandas load once
the options are read, so ``-h`` answers at once and a bad option fails fast.
"""
from mirage.argparsing import ArgumentParser
from mirage.config import parse_config
from mirage.errors import exit_on_user_error
from mirage.evaluate import EMPTY_VOLUME_MODES, HD95_MISSING_RULES  # constants only
from mirage.evaluate.intervals import BOOTSTRAP_RESAMPLES, check_resamples  # numpy only


@exit_on_user_error
def tune(argv=None):
    """Train, test or predict one run (``run_seg_tuning.py``); ``--demo`` runs the demo."""
    config, run_demo, _ = parse_config(argv)
    if run_demo:
        from mirage import demo  # deferred (here and below): torch, timm, OpenCV, pandas
        return demo.run(config)
    from mirage.report.tensorboard_log import write_tensorboard  # deferred
    from mirage.train import job  # deferred
    # Training is followed by the run's TensorBoard curves after every epoch, and once
    # more at the end for the test line of the best checkpoint.
    run_dir = job.main(config, on_epoch_end=write_tensorboard)
    write_tensorboard(run_dir)
    return run_dir


def eval_parser():
    """The options of ``run_seg_eval.py``."""
    parser = ArgumentParser(
        prog="run_seg_eval.py",
        description="Per-volume Dice, IoU and HD95 of a run's test predictions.")
    parser.add_argument("-d", "--datasets_path", default="./__datasets/Segmentation/",
                        help="folder holding the datasets (default: %(default)s)")
    parser.add_argument("--run_dir", "-m", "--model_path", dest="run_dir", nargs="+",
                        required=True, metavar="RUN_DIR",
                        help="run folders <output>/<version>/<dataset>/<run name>/ (several "
                             "for a summary table), or a folder holding run folders; a run "
                             "name without its _s<seed>_<hash> ending (as in the MIRAGE "
                             "guide) means every seed of it. -m/--model_path: the original's "
                             "name")
    parser.add_argument("-e", "--external", metavar="NAME", default=None,
                        help="evaluate preds_NAME/ (written with --test_data_path .../NAME) "
                             "against dataset NAME (masks in NAME/test/semseg or NAME/semseg)")
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
    parser.add_argument("--hd95_missing", choices=HD95_MISSING_RULES, default="original",
                        help="HD95 of a volume where a class is present but never in the "
                             "truth and the prediction of the same B-scan (e.g. never "
                             "predicted): original = the original tool's mean over B-scans, "
                             "often a perfect 0 (default); nan = left out of the means; "
                             "diagonal = the image diagonal sqrt(H^2+W^2)")
    parser.add_argument("--spacing", nargs="+", type=float, default=None,
                        metavar="UM",
                        help="AXIAL LATERAL [BSCAN]: micrometres per pixel down an A-scan "
                             "(rows), across a B-scan (columns) and between B-scans, "
                             "replacing the dataset's INFO.json \"spacing\"; adds HD95_um, "
                             "ASSD_um, boundary errors in um, lesion areas in mm^2 and, "
                             "with BSCAN, volumes in mm^3 and nL (default: INFO.json's, if "
                             "any; else pixels only)")
    parser.add_argument("--num_workers", "--workers", dest="num_workers", type=int,
                        default=1, metavar="N",
                        help="processes scoring B-scans in parallel (default: %(default)s; "
                             "--workers: the old name)")
    parser.add_argument("--summary", metavar="CSV", default=None,
                        help="also write one row per run and class group (mean ± std) to "
                             "this CSV file: a new file, or a summary an earlier "
                             "run_seg_eval.py wrote; never inside a run or dataset folder")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                        help="resamples of the 95%% bootstrap confidence intervals over "
                             "test volumes (BCa, fixed random state) in the --summary CSV "
                             "and the run reports (default: %(default)s; 0: none)")
    parser.add_argument("--foreign_predictions", action="store_true",
                        help="score predictions without a manifest of this run's best "
                             "checkpoint (e.g. made by another tool); noted in the output")
    parser.add_argument("--no_report", dest="report", action="store_false",
                        help="do not write report.html into each run directory")
    parser.add_argument("--overlays", action="store_true",
                        help="also draw every test B-scan (B-scan | truth | prediction | "
                             "errors) into <run>/overlays/ (or overlays_<external>/)")
    parser.add_argument("--report_only", action="store_true",
                        help="only (re)write each run's report.html from its results "
                             "CSVs; nothing is scored")
    return parser


@exit_on_user_error
def evaluate(argv=None):
    """Score the test predictions of one or more runs (``run_seg_eval.py``)."""
    args = eval_parser().parse_args(argv)
    check_resamples(args.bootstrap)
    if args.report_only:
        from mirage.evaluate.inputs import expand_run_paths  # deferred: OpenCV
        from mirage.report.run_report import write_run_report  # deferred: matplotlib
        run_dirs, _, notes = expand_run_paths(args.run_dir, need_predictions=False)
        print("".join(f"note: {note}\n" for note in notes), end="")
        paths = [write_run_report(path, args.datasets_path, bootstrap=args.bootstrap)
                 for path in run_dirs]
        print("\n".join(f"wrote {path}" for path in paths))
        return paths
    from mirage.evaluate.outputs import evaluate_runs  # deferred: pandas, OpenCV, SciPy

    def after_scoring(evaluation):  # scoring is followed by the run's overlays and report
        # overlays first: the report points to them and their legend
        if args.overlays:
            from mirage.report.overlays import LEGEND, write_overlays  # deferred: OpenCV
            folder = write_overlays(evaluation.run_dir, args.datasets_path,
                                    evaluation.external, ignore_bg=args.ignore_bg,
                                    foreign_predictions=args.foreign_predictions, quiet=False)
            print(f"wrote {folder} (colours: {folder.name}/{LEGEND})")
        if args.report:
            from mirage.report.run_report import write_run_report  # deferred: matplotlib
            path = write_run_report(evaluation.run_dir, args.datasets_path, quiet=False,
                                    bootstrap=args.bootstrap)
            print(f"wrote {path}")

    return evaluate_runs(args.run_dir, args.datasets_path, external=args.external,
                         ignore_bg=args.ignore_bg, empty_sets_nan=args.empty_sets_nan,
                         empty_volume=args.empty_volume, workers=args.num_workers,
                         summary=args.summary, foreign_predictions=args.foreign_predictions,
                         hd95_missing=args.hd95_missing, bootstrap=args.bootstrap,
                         spacing=args.spacing, on_scored=after_scoring)


# Console scripts exit with their function's return value: these return None (status 0);
# errors exit with status 2 through exit_on_user_error.
def tune_command():
    tune()


def evaluate_command():
    evaluate()
