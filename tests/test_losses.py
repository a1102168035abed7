"""Each loss against values computed by hand."""
import math

import pytest
import torch

from mirage.errors import UserError
from mirage.train.losses import build_loss, generalised_dice_loss

# One image, two classes, two pixels. Pixel a: logits (0, 0) -> p = (1/2, 1/2), truth 0.
# Pixel b: logits (ln 3, 0) -> p = (3/4, 1/4), truth 1.
LOGITS = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
TARGET = torch.tensor([[[0, 1]]])                                # (1, 1, 2)
CE = (math.log(2) + math.log(4)) / 2
# weights 1/1^2 for both classes; intersections 1/2 and 1/4; |p| + |g| = 2.25 and 1.75
GDICE = 1 - (2 * (0.5 + 0.25) + 1e-5) / ((2.25 + 1.75) + 1e-5)


def test_ce():
    assert build_loss("CE")(LOGITS, TARGET).item() == pytest.approx(CE, rel=1e-6)


def test_ce_ignore_bg_drops_background_pixels():
    assert build_loss("CE-ignore-bg", 0)(LOGITS, TARGET).item() == \
        pytest.approx(math.log(4), rel=1e-6)


def test_generalised_dice_by_hand():
    assert generalised_dice_loss(LOGITS, TARGET).item() == pytest.approx(GDICE, rel=1e-6)


def test_absent_classes_get_the_largest_finite_weight():
    # truth all class 0 over two pixels, 3 classes, uniform probabilities 1/3:
    # w = (1/4, inf, inf) -> (1/4, 1/4, 1/4); sum w*I = 1/4 * 2/3; sum w*(|p|+|g|) = 1
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    expected = 1 - (2 * (1 / 6) + 1e-5) / (1 + 1e-5)
    assert generalised_dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_cegdice_is_half_and_half_and_averages_images():
    loss = build_loss("CEGDice")
    assert loss(LOGITS, TARGET).item() == pytest.approx(0.5 * CE + 0.5 * GDICE, rel=1e-6)
    other_logits, other_target = torch.zeros(1, 2, 1, 2), torch.tensor([[[1, 1]]])
    # image 2: CE = ln 2 for both pixels; Dice: w = (1/4 -> inf -> 1/4, 1/4),
    # sum w*I = 1/4 * 1, sum w*(|p|+|g|) = 1/4 * (1 + 3) = 1
    other_dice = 1 - (2 * 0.25 + 1e-5) / (1 + 1e-5)
    batch = loss(torch.cat([LOGITS, other_logits]), torch.cat([TARGET, other_target]))
    expected = 0.5 * (CE + math.log(2)) / 2 + 0.5 * (GDICE + other_dice) / 2
    assert batch.item() == pytest.approx(expected, rel=1e-6)


def test_ce_ignore_bg_without_background_is_an_error():
    with pytest.raises(UserError, match="--ignore_index"):
        build_loss("CE-ignore-bg", None)


def test_losses_backpropagate():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    for name in ("CE", "CE-ignore-bg", "CEGDice"):
        logits.grad = None
        build_loss(name, 0)(logits, target).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["CE", "CE-ignore-bg", "CEGDice"])
def test_all_background_batch_gives_zero_or_finite_loss_and_finite_gradient(name):
    # A lesion dataset's typical batch: every pixel is background (class 0).
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    loss = build_loss(name, 0)(logits, target)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(logits.grad).all()
    if name == "CE-ignore-bg":  # nothing to score: exactly zero loss and gradient
        assert loss.item() == 0.0
        assert torch.count_nonzero(logits.grad) == 0


def test_ce_ignore_bg_mean_is_over_scored_pixels_only():
    # Two images; only one foreground pixel in the whole batch: loss = its CE.
    logits = torch.zeros(2, 2, 1, 2)
    logits[1, 1, 0, 1] = math.log(3.0)  # p(class 1) = 3/4 at that pixel
    target = torch.zeros(2, 1, 2, dtype=torch.long)
    target[1, 0, 1] = 1
    assert build_loss("CE-ignore-bg", 0)(logits, target).item() == \
        pytest.approx(-math.log(0.75), rel=1e-6)
