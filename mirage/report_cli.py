"""The command line of ``run_seg_report.py`` (a grid's summary, tests and reports).

Only argparse is imported up front: pandas, SciPy and matplotlib load once the options
are read, so ``-h`` answers at once. The work is done by mirage.report.study_outputs.
"""
from pathlib import Path

import yaml

from mirage.argparsing import ArgumentParser
from mirage.errors import UserError, exit_on_user_error
from mirage.evaluate.intervals import BOOTSTRAP_RESAMPLES, check_resamples  # numpy only
from mirage.report import RUN_REPORT_MODES, TABLE_COLUMNS  # constants: nothing heavy


def report_parser():
    parser = ArgumentParser(
        prog="run_seg_report.py",
        description="Summarise evaluated runs over seeds: paper tables (CSV, Markdown, "
                    "LaTeX) with 95% bootstrap intervals, paired Wilcoxon tests with the "
                    "bootstrap interval of each difference, and HTML reports.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="output roots (e.g. ./__output/seg/v1) or run folders")
    parser.add_argument("-o", "--output_dir", default="./__output/study",
                        help="folder for the study's files (default: %(default)s)")
    parser.add_argument("-d", "--datasets_path", default=None,
                        help="folder holding the datasets, for the run reports' overlay "
                             "gallery (default: the one recorded by run_seg_eval.py)")
    parser.add_argument("--metric", default="Dice", metavar="METRIC",
                        help="metric of the heat map and the HTML test table: Dice, IoU, "
                             "HD95 or any other the results hold, e.g. HD95_um (default: "
                             "%(default)s)")
    parser.add_argument("--metrics", "--table_metrics", dest="table_metrics", nargs="+",
                        default=["Dice", "HD95"], metavar="METRIC",
                        help="metrics of the paper tables (summary.md, summary.tex, "
                             "report.html), one table each: Dice, IoU, HD95 or any other "
                             "the runs' results hold, e.g. HD95_um (default: Dice HD95; "
                             "--table_metrics: the old name)")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                        help="resamples of the 95%% bootstrap confidence intervals over "
                             "test volumes (BCa, fixed random state) in summary.csv, "
                             "significance.csv and the run reports (default: %(default)s; "
                             "0: none)")
    parser.add_argument("--ci", action="store_true",
                        help="show each cell's 95%% bootstrap interval in the paper tables "
                             "(summary.md, summary.tex, report.html): 'mean ± std (low, "
                             "high)'")
    parser.add_argument("--columns", choices=TABLE_COLUMNS, default="dataset",
                        help="columns of the paper tables: 'dataset' (default; rows = "
                             "models) or 'tuning' (one table per dataset, rows = models, "
                             "columns = the --tuning protocols of the runs)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level after Holm-Bonferroni (default: 0.05)")
    parser.add_argument("--run_reports", choices=RUN_REPORT_MODES, default="missing",
                        help="write each run's report.html when it has none (missing, "
                             "default), rewrite all, or none")
    parser.add_argument("--label", action="append", default=None, metavar="NAME=TEXT",
                        help="row label TEXT for the weights file NAME (file name or stem: "
                             "MIRAGE-Base.pth=Ours gives 'Ours, lr 1e-3') or for a whole "
                             "automatic row label NAME; repeatable; @FILE.yaml reads "
                             "NAME: TEXT lines")
    parser.add_argument("--no_tensorboard", dest="tensorboard", action="store_false",
                        help="do not write TensorBoard event files with the run reports")
    return parser


@exit_on_user_error
def main(argv=None):
    """Find, group and summarise the runs (``run_seg_report.py``); returns the files."""
    args = report_parser().parse_args(argv)
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1, not {args.alpha}")
    check_resamples(args.bootstrap)
    labels = parse_labels(args.label or [])
    from mirage.report.study_outputs import write_study  # deferred: pandas, SciPy, matplotlib
    return write_study(args.paths, args.output_dir, datasets_path=args.datasets_path,
                       run_reports=args.run_reports, metric=args.metric,
                       table_metrics=tuple(args.table_metrics), alpha=args.alpha,
                       tensorboard=args.tensorboard, labels=labels, columns=args.columns,
                       bootstrap=args.bootstrap, ci=args.ci)


def parse_labels(items):
    """``["NAME=TEXT", ...]`` (--label) -> ``{NAME: TEXT}``; a file of them: ``@labels.yaml``
    holding ``NAME: TEXT`` lines (the YAML form)."""
    labels = {}
    for item in items:
        if item.startswith("@"):
            path = item[1:]
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as err:
                raise UserError(f"--label {item}: cannot read {path} ({err})") from None
            if not isinstance(loaded, dict):
                raise UserError(f"--label {item}: {path} must map NAME: TEXT")
            labels.update({str(k): str(v) for k, v in loaded.items()})
            continue
        name, equals, text = item.partition("=")
        if not equals or not name.strip() or not text.strip():
            raise UserError(f"--label {item!r}: write NAME=TEXT, e.g. --label "
                            "MIRAGE-Base.pth=Ours")
        labels[name.strip()] = text.strip()
    return labels


def report_command():
    """Console-script entry point (no return value for the exit status)."""
    main()
