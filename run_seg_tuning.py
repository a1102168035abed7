#!/usr/bin/env python3
"""Tune a segmentation decoder on a frozen retinal-OCT foundation model.

    python run_seg_tuning.py -c _cfgs/seg_200e_convnext.yaml \\
        --weights ./__weights/MIRAGE-Base.pth --data_path ./__datasets/Segmentation/Duke_DME/
    python run_seg_tuning.py ... --infer_only --test     # write test predictions as PNGs
    python run_seg_tuning.py --demo                        # everything on synthetic data

Options: ``-h``; documentation: docs/segmentation_tuning.md. The work is done in
mirage/cli.py (which imports torch only once the options are read) and mirage/train/job.py.
"""
from mirage.cli import tune as main

if __name__ == "__main__":
    main()
