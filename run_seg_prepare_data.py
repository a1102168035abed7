#!/usr/bin/env python
"""Build a dataset in the benchmark layout from OCT volume files (eyepy: pip install .[oct]).

    python run_seg_prepare_data.py -i scans/*.eye duke/ -o ./__datasets/Segmentation/MyOCT
    python run_seg_prepare_data.py -i vols/ -o ./MyOCT --layers ILM BM --split 0.7 0.15 0.15

Each B-scan becomes <file stem>_<B-scan index>.png with a mask made from the layer heights
and pixel annotations; volumes are split by patient; INFO.json carries the classes and the
spacing of the files; the dataset check runs at the end. Rules: docs/segmentation_benchmark.md,
"Datasets from OCT files". Options: mirage/prepare_cli.py.
"""
from mirage.prepare_cli import prepare_data as main
from mirage.prepare_cli import prepare_parser as build_parser  # noqa: F401 (the options)

if __name__ == "__main__":
    main()
