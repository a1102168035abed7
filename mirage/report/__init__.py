"""The report stage: what a person reads after runs are scored.

    htmlpage.py, plots.py   static HTML building blocks and matplotlib figures
    run_report.py           report.html of one run (with gallery.py's overlays)
    overlays.py             every test B-scan drawn; a predicted mask on its B-scan
    tensorboard_log.py      log.txt as TensorBoard event files
    study.py                runs grouped over seeds; summary statistics
    metric_columns.py       which metrics, their units and direction; a row's intervals
    boundaries.py           layer boundary errors (run_seg_eval.py's file) in the reports
    labels.py               readable row labels (model + what differs, in words)
    significance.py         paired Wilcoxon tests with Holm-Bonferroni
    label_efficiency.py     the score against the training volumes: curves, AUC, tests
    label_efficiency_outputs.py  their files and sections of the study's outputs
    tables.py               paper tables (Markdown, LaTeX)
    grid_report.py          the study's report.html
    study_outputs.py        every file of run_seg_report.py

It reads run folders (mirage.run) and scores (mirage.evaluate); it never trains. This file
imports nothing, so the command-line parser can read the constants below at once.
"""
RUN_REPORT_MODES = ("missing", "all", "none")  # run_seg_report.py --run_reports
# run_seg_report.py --columns: what the paper tables' columns are (mirage.report.tables)
TABLE_COLUMNS = ("dataset", "tuning")
