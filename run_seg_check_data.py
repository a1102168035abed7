#!/usr/bin/env python
"""Run every check training runs on datasets, and summarise each one.

    python run_seg_check_data.py --data_path ./__datasets/Segmentation/Duke_DME/ ./AROI/
    python run_seg_check_data.py --data_path ./my_dataset/ --mapping_fn ./my_INFO.json

Prints per split the volumes, B-scans, class pixel shares, B-scan sizes and bit depths;
exit status 2 with one ``error:`` per broken dataset listing every problem (one line
each). What is checked: docs/segmentation_benchmark.md, "Checks before training".
Options: mirage/predict_cli.py.
"""
from mirage.predict_cli import check_data as main
from mirage.predict_cli import check_data_parser as build_parser  # noqa: F401 (the options)

if __name__ == "__main__":
    main()
