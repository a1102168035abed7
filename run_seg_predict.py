#!/usr/bin/env python
"""Predict any folder of B-scans with a trained run: one mask PNG of INFO.json values per
input, optionally class probabilities (.npz) and colour overlays.

    python run_seg_predict.py --run_dir <output>/v1/Duke_DME/<run name>/ -i scans/ -o masks/
    python run_seg_predict.py --run_dir <run> -i a.png b.tif -o out/ --probabilities --overlays

Options: mirage/predict_cli.py; the Python API: mirage/train/predictor.py (load_run).
"""
from mirage.predict_cli import predict as main
from mirage.predict_cli import predict_parser as build_parser  # noqa: F401 (the options)

if __name__ == "__main__":
    main()
