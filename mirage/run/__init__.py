"""The run stage: everything about one run directory.

    folder.py       RunFolder: the name of every file of a run and how each is read/written
    identity.py     which options define a run, its name and hash, and the checks on them
    spec.py         the options resolved once into a typed RunSpec
    lock.py         one writer per run directory
    predictions.py  prediction folders sealed by a manifest of their checkpoint
    results.py      results CSVs and evaluation.json read back as scores
    catalog.py      finding run directories and reading each one whole

It stands on mirage.config, mirage.data and the model registry (fm_seg_config), and never
imports the train, evaluate, report or grid stages. This file imports nothing, so the
command-line parsers can read the constant below without loading pandas or OpenCV.
"""
# The score columns of a results CSV (after ID and Class): Dice and IoU as fractions,
# HD95 in pixels.
METRICS = ("Dice", "IoU", "HD95")
