"""``run_seg_tuning.py --demo``: the whole main job on a laptop CPU, nothing downloaded.

1. writes a synthetic OCT dataset in the benchmark layout (``__demo/datasets/Synth_OCT``),
2. writes a tiny randomly initialised encoder in the MIRAGE checkpoint layout
   (``__demo/weights/MIRAGE-Tiny.pth``; the registry's ``mirage-tiny`` entry),
3. trains the decoder (options from ``mirage/demo.yaml``, overridable on the command line),
4. predicts the test split (``--infer_only --test``),
5. evaluates the predictions with ``run_seg_eval.py``'s per-volume Dice/IoU/HD95 (and, from
   the made-up spacing in the dataset's INFO.json, HD95/ASSD and the layer boundary errors
   in micrometres, printed per boundary) and
6. writes the run's ``report.html`` and prints its path.
"""
from pathlib import Path

import numpy as np
import torch

from fm_seg_config import MirageTiny
from mirage import checkpoint_io as ckpt
from mirage.config import DEMO_DATASET, DEMO_ROOT, demo_paths
from mirage.data.classes import read_spacing
from mirage.data.synthetic import write_synthetic_dataset
from mirage.evaluate.outputs import evaluate_run
from mirage.report.run_report import write_run_report
from mirage.report.tensorboard_log import write_tensorboard
from mirage.train import job

LAYER_DICE_TARGET = 0.7
# The demo dataset's INFO.json "spacing". MADE UP: synthetic B-scans have no physical scale.
# Chosen so that the synthetic retina (about 50 of 128 rows) is a few hundred micrometres
# thick and the 192 columns span a few millimetres, as on a macular scan; real datasets
# take theirs from the device (docs/segmentation_benchmark.md, "Physical spacing").
DEMO_SPACING = {"axial_um": 6.0, "lateral_um": 30.0, "bscan_um": 120.0}


def write_tiny_checkpoint(path, seed=0):
    """A random MIRAGE-Tiny encoder saved as MIRAGE pretraining checkpoints are."""
    torch.manual_seed(seed)
    fm = MirageTiny()
    size = fm.pretrain_input_size
    encoder = fm.build((size, size), (fm.default_patch_size,) * 2, num_global_tokens=1)
    payload = fm.checkpoint_from(encoder)
    payload["epoch"] = 0
    ckpt.save(path, payload)
    return path


def prepare_inputs(root=DEMO_ROOT):
    """Create (once) and return the demo's ``(weights path, dataset path)``."""
    weights, data_path = demo_paths(root)
    info = data_path / "INFO.json"
    # A demo dataset written before it had a spacing is written again (the same images).
    if not info.is_file() or read_spacing(info) is None:
        write_synthetic_dataset(root / "datasets", name=DEMO_DATASET, seed=0,
                                overwrite=True, spacing=DEMO_SPACING)
    if not weights.is_file():
        write_tiny_checkpoint(weights)
    return weights, data_path


def run(config):
    """Train, predict and evaluate; returns the evaluation table."""
    weights, data_path = prepare_inputs()
    config = dict(config)
    config["weights"] = config["weights"] or str(weights)
    config["data_path"] = config["data_path"] or str(data_path)
    print(f">> demo: dataset {config['data_path']}, weights {config['weights']}")
    run_dir = job.main({**config, "test": False, "infer_only": False},
                       on_epoch_end=write_tensorboard)
    job.main({**config, "test": True, "infer_only": True}, announce=False)
    results = evaluate_run(run_dir, datasets_path=Path(config["data_path"]).parent).rows
    layer_dice = layer_mean_dice(results)
    verdict = "reached" if layer_dice > LAYER_DICE_TARGET else "did NOT reach"
    print(f">> demo: test mean Dice over the layer classes {layer_dice:.3f} "
          f"({verdict} the target {LAYER_DICE_TARGET})")
    report = write_run_report(run_dir, datasets_path=Path(config["data_path"]).parent)
    print(f">> demo: report (training curves, test scores, overlays): {report}")
    return results


def layer_mean_dice(results):
    """Mean Dice over the rows of non-lesion (layer) classes of the evaluation table."""
    layers = results[~results["Class"].str.lower().isin(["fluid"])]
    return float(np.nanmean(layers["Dice"].to_numpy(dtype=float)))
