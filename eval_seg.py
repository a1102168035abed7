#!/usr/bin/env python
"""``eval_seg.py``: the name the MIRAGE "Segmentation tuning" guide gives the evaluation
script, kept so that the guide's commands run as written. It is ``run_seg_eval.py``:

    python eval_seg.py --model_path ./__output/seg/v1/Duke_DME/MIRAGE-Base_frozen_convnext_CEGDice/
"""
from mirage.cli import evaluate as main

if __name__ == "__main__":
    main()
