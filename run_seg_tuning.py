#!/usr/bin/env python3
"""Tune a segmentation decoder on a frozen retinal-OCT foundation model.

    python run_seg_tuning.py -c _cfgs/seg_200e_convnext.yaml \\
        --weights ./__weights/MIRAGE-Base.pth --data_path ./__datasets/Segmentation/Duke_DME/
    python run_seg_tuning.py ... --infer_only --test     # write test predictions as PNGs
    python run_seg_tuning.py --demo                        # everything on synthetic data

Options: ``-h``; documentation: docs/segmentation_tuning.md.
"""
from mirage import demo, engine
from mirage.config import parse_config
from mirage.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    config, run_demo, _ = parse_config(argv)
    if run_demo:
        return demo.run(config)
    return engine.main(config)


if __name__ == "__main__":
    main()
