#!/usr/bin/env python
"""From a grid of evaluated runs to the paper's tables: seeds averaged, models compared.

    python run_seg_report.py ./__output/seg/v1 -o ./__output/study_v1
    python run_seg_report.py <run dir> <run dir> ... -o study --run_reports all

Finds every run directory (one with config.yaml) at or under the given paths, groups the
evaluated ones by (dataset, model, decoder, loss, protocol) across seeds and writes
summary.csv, summary.md, summary.tex, significance.csv, runs.csv and report.html into the
output folder (plus each run's report.html). Definitions: docs/segmentation_tuning.md,
"From runs to a paper table". Options: mirage/report_cli.py.
"""
from mirage.report_cli import main, report_parser as build_parser  # noqa: F401

if __name__ == "__main__":
    main()
