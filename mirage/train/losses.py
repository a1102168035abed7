"""Training losses: CE, CE ignoring the background class, and CE + generalised Dice.

Every loss is defined on every batch: a batch with no pixel to score (e.g. a fluid
dataset's B-scans with --loss CE-ignore-bg, where all pixels are background) contributes
zero loss and zero gradient, never NaN. (PyTorch's mean-reduced cross-entropy divides by
the number of scored pixels and returns 0/0 = NaN there.)
"""
import torch
import torch.nn.functional as F
from torch import nn

from mirage.errors import UserError


def generalised_dice_loss(logits, target, smooth=1e-5):
    """Generalised Dice loss (Sudre et al. 2017), averaged over the images of a batch.

    logits: (B, K, H, W); target: (B, H, W) class indices. Per image, with softmax
    probabilities p and one-hot truth g (background included) and class weights
    w_k = 1 / (sum_i g_ik)^2 (a class absent from the image would get an infinite weight;
    it gets the image's largest finite weight instead)::

        GDL = 1 - (2 * sum_k w_k sum_i p_ik g_ik + smooth) / (sum_k w_k sum_i (p_ik + g_ik) + smooth)
    """
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum(dim=(2, 3))  # (B, K)
    truth = onehot.sum(dim=(2, 3))
    both = truth + probs.sum(dim=(2, 3))
    weights = 1.0 / truth.square()
    infinite = torch.isinf(weights)
    finite_max = weights.masked_fill(infinite, 0.0).amax(dim=1, keepdim=True)
    weights = torch.where(infinite, finite_max, weights)
    score = (2.0 * (weights * intersection).sum(1) + smooth) / ((weights * both).sum(1) + smooth)
    return (1.0 - score).mean()


class CrossEntropyLoss(nn.Module):
    """Mean cross-entropy over the scored pixels (those whose class is not ``ignore_index``).

    logits (B, K, H, W), target (B, H, W) -> scalar; 0 (with zero gradient) when no pixel
    is scored.
    """

    def __init__(self, ignore_index=None):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        if self.ignore_index is None:
            return F.cross_entropy(logits.float(), target)
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                                reduction="sum")
        scored = (target != self.ignore_index).sum()
        return total / scored.clamp(min=1)


class CEGDiceLoss(nn.Module):
    """0.5 * cross-entropy + 0.5 * generalised Dice."""

    def forward(self, logits, target):
        return 0.5 * F.cross_entropy(logits.float(), target) + \
            0.5 * generalised_dice_loss(logits, target)


def build_loss(name, ignore_index=None):
    """The criterion for ``--loss``: logits (B, K, H, W), target (B, H, W) -> scalar."""
    if name == "CE":
        return CrossEntropyLoss()
    if name == "CE-ignore-bg":
        if ignore_index is None:
            raise UserError("--loss CE-ignore-bg needs a background class: INFO.json has no "
                            "class labelled background/bg; set --ignore_index or use "
                            "--loss CE")
        return CrossEntropyLoss(ignore_index)
    if name == "CEGDice":
        return CEGDiceLoss()
    raise UserError(f"--loss {name}: unknown; choose CE, CE-ignore-bg or CEGDice")
