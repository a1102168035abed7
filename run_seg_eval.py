#!/usr/bin/env python
"""Evaluate test predictions: per-volume Dice, IoU and HD95 per class, into CSV files.

    python run_seg_eval.py --model_path ./__output/seg/v1/Duke_DME/<run name>/
    python run_seg_eval.py -m <AROI run> --external Duke_iAMD
    python run_seg_eval.py -m <run 1> <run 2> ... --summary table.csv --num_workers 4

Reads <model_path>/preds/ (written by run_seg_tuning.py --infer_only --test) and the
dataset's test masks; writes results.csv (or results_layers.csv + results_lesions.csv)
into the run directory and prints the means. Definitions and conventions:
docs/segmentation_tuning.md, "Evaluation (run_seg_eval.py)". Options: mirage/cli.py.
"""
from mirage.cli import eval_parser as build_parser  # noqa: F401 (the options, for callers)
from mirage.cli import evaluate as main

if __name__ == "__main__":
    main()
