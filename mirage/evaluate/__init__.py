"""The evaluate stage: per-volume Dice, IoU and HD95 of a run's test predictions (with a
pixel spacing also in micrometres), layer boundary errors and thicknesses, lesion areas
and volumes.

    class_plan.py   which classes are scored; pixel values -> classes; label translations
    inputs.py       find and check predictions, masks and class tables (nothing decoded)
    metrics.py      Dice, IoU and HD95; HD95 and ASSD in micrometres (checked against MONAI)
    layers.py       layer boundary rows of a label map, thicknesses, their error sums
    scoring.py      one B-scan -> one volume -> a run's rows, over worker processes
    measurements.py per-volume boundary errors, thicknesses, lesion areas and volumes
    outputs.py      results CSVs, evaluation.json, printed tables, the summary CSV

It reads run folders and datasets (mirage.run, mirage.data) and never imports the train
or report stages: run_seg_eval.py (mirage.cli) decides that a report follows the scores.
This file stays free of imports so that ``-h`` can read the choices below at once.
"""
EMPTY_VOLUME_MODES = ("zero", "nan")  # run_seg_eval.py --empty_volume
# run_seg_eval.py --hd95_missing: the HD95 of a volume where a class is never in the truth
# and the prediction of the same B-scan (e.g. never predicted); see scoring.volume_scores.
HD95_MISSING_RULES = ("original", "nan", "diagonal")
