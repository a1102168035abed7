"""The data stage: datasets in the benchmark layout (docs/segmentation_benchmark.md).

    classes.py     INFO.json -> ClassTable; what class labels mean (background, lesion)
    layout.py      slice names, split folders, dataset folders and their checks
    dataset.py     a split as a torch Dataset
    transforms.py  resizing, augmentation and normalisation of B-scans and masks
    synthetic.py   synthetic OCT volumes in the benchmark layout (demo, tests, benchmarks)
    check.py       every check training makes, as a command with a summary
    oct_files.py   OCT volume files read with eyepy: B-scan images, masks from layer heights
    oct_dataset.py a dataset in this layout built from OCT files (run_seg_prepare_data.py)

It stands on the ground floor only (mirage.errors, mirage.fileio).
"""
