#!/usr/bin/env python
"""Evaluate test predictions: per-volume Dice, IoU and HD95 per class, into CSV files.

    python run_seg_eval.py --model_path ./__output/seg/v1/Duke_DME/<run name>/
    python run_seg_eval.py -m <AROI run> --external Duke_iAMD
    python run_seg_eval.py -m <run 1> <run 2> ... --summary table.csv --workers 4

Reads <model_path>/preds/ (written by run_seg_tuning.py --infer_only --test) and the
dataset's test masks; writes results.csv (or results_layers.csv + results_lesions.csv)
into the run directory and prints the means. Definitions and conventions:
docs/segmentation_tuning.md, "Evaluation (run_seg_eval.py)".
"""
import argparse

from mirage.errors import exit_on_user_error
from mirage.evaluation import EMPTY_VOLUME_MODES, evaluate_runs


def build_parser():
    parser = argparse.ArgumentParser(
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
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    return evaluate_runs(args.model_path, args.datasets_path, external=args.external,
                         ignore_bg=args.ignore_bg, empty_sets_nan=args.empty_sets_nan,
                         empty_volume=args.empty_volume, workers=args.workers,
                         summary=args.summary)


if __name__ == "__main__":
    main()
