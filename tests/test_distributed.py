"""torchrun with 2 CPU processes (gloo) trains the same model as one process with the same
global batch: DistributedSampler shards the same permutation, DDP averages gradients."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from mirage import checkpoint_io as ckpt

# Float32 sums are reduced in a different order across processes; after 2 epochs of
# AdamW the weights agree to about 1e-6.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def train(tmp_path, dataset, weights, out, batch_size, nproc=None):
    args = ["--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
            "--patch_size", "16", "--batch_size", str(batch_size), "--num_workers", "0",
            "--base_output_dir", str(out), "--epochs", "2", "--save_ckpt_freq", "1",
            "--keep_ckpts", "2",
            "--lr", "1e-3", "--loss", "CEGDice", "--output_adapter", "convnext",
            "--aug_name", "none", "--drop_path_encoder", "0", "--device", "cpu"]
    script = str(REPO / "run_seg_tuning.py")
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", script, *args]
    else:
        command = [sys.executable, script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = list((out / "v1" / "Tiny").glob("MIRAGE-Tiny_frozen_convnext_CEGDice_s*_*"))
    assert len(found) == 1, found
    return found[0], result


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_process_gloo_run_equals_single_process(tmp_path, tiny_dataset, tiny_weights):
    single, _ = train(tmp_path, tiny_dataset, tiny_weights, tmp_path / "single", batch_size=4)
    multi, result = train(tmp_path, tiny_dataset, tiny_weights, tmp_path / "multi",
                          batch_size=2, nproc=2)
    assert result.stdout.count("epoch 1/1") == 1          # only rank 0 logs (epochs from 0)
    assert (multi / "log.txt").read_text().count('"epoch"') == 2
    a = ckpt.load_file(single / "checkpoint-1.pth")["model"]
    b = ckpt.load_file(multi / "checkpoint-1.pth")["model"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOLERANCE)
    # training really moved the decoder: the comparison is not between initial states
    first = ckpt.load_file(single / "checkpoint-0.pth")["model"]
    assert not torch.equal(first["decoder.final_layer.weight"], a["decoder.final_layer.weight"])
