"""How fast each ConvNeXt decoder variant starts to learn; prints one JSON object.

Decoder-only training (the encoder frozen and run once: its tokens are cached) on the
synthetic OCT dataset (9 classes) at 256x256, patch 32, with a randomly initialised
MIRAGE-Base-sized encoder (D = 768), the paper's loss (CEGDice) and optimiser (AdamW,
lr 1e-4 constant, weight decay 0.05 on weights, betas 0.9/0.999), batch 4, the same
batches for every decoder. Reports the training loss (mean of the 5 steps ending there)
at some steps, and the layer-scale gammas' mean absolute value at the end.

    python benchmarks/bench_decoder_init.py [--steps 60] [--decoders convnext convnext_ls]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from fm_seg_config import MirageBase  # noqa: E402
from mirage.data.dataset import SegmentationDataset  # noqa: E402
from mirage.data.layout import find_split, open_dataset  # noqa: E402
from mirage.models.decoders import build_decoder  # noqa: E402
from mirage.train.losses import build_loss  # noqa: E402
from mirage.data.synthetic import write_synthetic_dataset  # noqa: E402
from mirage.data.transforms import SegmentationTransform  # noqa: E402

SIZE, PATCH, BATCH = 256, 32, 4


@torch.no_grad()
def cached_tokens(root, count):
    """(tokens (S, N, D) of the last encoder block, masks (S, H, W)) of ``count`` B-scans."""
    folder = write_synthetic_dataset(root, name="Bench", splits={"train": 4},
                                     slices_per_volume=count // 4, size=(SIZE, SIZE))
    table = open_dataset(folder).class_table
    data = SegmentationDataset(find_split(folder / "train", need_masks=True), table,
                               SegmentationTransform((SIZE, SIZE)))
    torch.manual_seed(0)
    encoder = MirageBase().build((SIZE, SIZE), (PATCH, PATCH), 1).eval()
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    masks = torch.stack([torch.as_tensor(data[i]["mask"]).long() for i in range(len(data))])
    n = (SIZE // PATCH) ** 2
    tokens = torch.cat([encoder.forward_layers(images[i:i + 8], [encoder.depth - 1])[0][:, :n]
                        for i in range(0, len(images), 8)])
    return tokens, masks, table.num_classes


def train(name, tokens, masks, num_classes, steps, seed=0):
    torch.manual_seed(seed)
    decoder = build_decoder(name, embed_dim=tokens.shape[-1], num_classes=num_classes,
                            grid_size=SIZE // PATCH, patch_size=PATCH, image_size=SIZE,
                            encoder_depth=12).train()
    decays = {n: p.ndim > 1 and not n.endswith(".bias") for n, p in decoder.named_parameters()}
    decay = [p for n, p in decoder.named_parameters() if decays[n]]
    rest = [p for n, p in decoder.named_parameters() if not decays[n]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": rest, "weight_decay": 0.0}], lr=1e-4)
    criterion = build_loss("CEGDice")
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(tokens)),
                                                              steps * BATCH))
    losses = []
    for step in range(steps):
        idx = torch.as_tensor(order[step * BATCH:(step + 1) * BATCH])
        loss = criterion(decoder([tokens[idx]]), masks[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    gammas = [p.detach().abs().mean().item() for n, p in decoder.named_parameters()
              if "gamma" in n]
    return losses, (float(np.mean(gammas)) if gammas else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--decoders", nargs="+", default=["convnext", "convnext_ls"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokens, masks, num_classes = cached_tokens(Path(tmp), args.images)
    report = {"setup": f"decoder only, {SIZE}x{SIZE}, patch {PATCH}, {num_classes} classes, "
                       f"D={tokens.shape[-1]}, CEGDice, AdamW lr 1e-4, batch {BATCH}"}
    marks = [s for s in (1, 10, 25, 50, args.steps) if s <= args.steps]
    for name in args.decoders:
        losses, gamma = train(name, tokens, masks, num_classes, args.steps)
        report[name] = {f"loss@{s}": round(float(np.mean(losses[max(0, s - 5):s])), 4)
                        for s in marks}
        if gamma is not None:
            report[name]["mean |gamma| at end"] = gamma
    print(json.dumps(report))


if __name__ == "__main__":
    main()
