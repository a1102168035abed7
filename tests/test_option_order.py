"""Options checked against each other (mirage.option_checks.check_option_order): pairs
whose values must be in order are one-line errors naming both options; pairs whose
"wrong" order is legitimate (a rising weight decay, a frequency above --epochs) pass."""
import pytest

from mirage.cli import tune
from mirage.config import parse_config
from mirage.errors import UserError
from mirage.option_checks import check_config

REQUIRED = ["--weights", "w/MIRAGE-Base.pth", "--data_path", "d/Duke_DME"]


def checked(*argv):
    config, _, _ = parse_config([*REQUIRED, *map(str, argv)])
    check_config(config)
    return config


REFUSED = [
    (("--lr", "1e-4", "--min_lr", "1e-3"),
     "--min_lr 0.001 is above --lr 0.0001: the cosine schedule would rise from --lr to "
     "--min_lr; give a --min_lr of at most --lr (e.g. 0)"),
    (("--lr", "1e-4", "--warmup_lr", "1e-3"),
     "--warmup_lr 0.001 is above --lr 0.0001: the warmup would fall to --lr instead of "
     "rising; give a --warmup_lr of at most --lr (e.g. 0)"),
    (("--lr", "1e-4", "--warmup_lr", "1e-3", "--warmup_epochs", "0", "--warmup_steps", "5"),
     "--warmup_lr 0.001 is above --lr 0.0001"),
    (("--epochs", "5", "--warmup_epochs", "6"),
     "--warmup_epochs 6 is longer than the run (--epochs 5): the schedule would squeeze it "
     "into the run; give a --warmup_epochs of at most --epochs"),
    (("--epochs", "5", "--start_epoch", "5"),
     "--start_epoch 5: must be in 0..epochs-1 (--epochs 5); nothing would be trained"),
    (("--log_images", "--eval_freq", "2", "--log_images_freq", "3"),
     "--log_images_freq 3 is not a multiple of --eval_freq 2: panels are drawn only in "
     "validated epochs, so they would come every 6 epochs; give a multiple of --eval_freq"),
    (("--keep_ckpts", "0"), "--keep_ckpts must be at least 1 (got 0)"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[a[0] if a[0] != "--lr" else a[2]
                                                       for a, _ in REFUSED])
def test_options_out_of_order_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as info:
        checked(*argv)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


ACCEPTED = [
    ("--lr", "1e-3", "--min_lr", "1e-3"),                 # equal: a constant schedule
    ("--lr", "1e-3", "--warmup_lr", "1e-3"),              # a flat warmup
    ("--lr", "1e-4", "--warmup_lr", "1e-3", "--warmup_epochs", "0"),  # no warmup: unused
    ("--epochs", "1"),                                    # the default 1 warmup epoch = run
    ("--epochs", "3", "--warmup_epochs", "9", "--warmup_steps", "10"),  # steps override
    ("--epochs", "2", "--warmup_steps", "100000"),        # steps per epoch unknown here
    ("--weight_decay", "0.04", "--weight_decay_end", "0.4"),  # a rising decay (DINO)
    ("--weight_decay", "0.4", "--weight_decay_end", "0.04"),
    ("--decoder_decay", "2"),                             # a multiplier, not a value
    ("--epochs", "10", "--save_ckpt_freq", "50", "--eval_freq", "50",
     "--log_images_freq", "50"),                          # then: only at the end
    ("--eval_freq", "2", "--log_images_freq", "3"),       # no --log_images: unused
    ("--log_images", "--eval_freq", "2", "--log_images_freq", "4"),
    ("--epochs", "5", "--start_epoch", "7", "--test"),    # testing trains nothing
]


@pytest.mark.parametrize("argv", ACCEPTED, ids=[" ".join(a) for a in ACCEPTED])
def test_legitimate_orders_pass(argv):
    checked(*argv)


def test_run_seg_tuning_refuses_a_rising_lr_before_it_trains(capsys, tmp_path):
    """The issue: --min_lr above --lr trained, the loss exploded, exit 0."""
    with pytest.raises(SystemExit) as exc:
        tune([*REQUIRED, "--lr", "1e-4", "--min_lr", "1e-2",
              "--base_output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --min_lr 0.01 is above --lr 0.0001: the cosine schedule would rise "
                   "from --lr to --min_lr; give a --min_lr of at most --lr (e.g. 0)"]
    assert not (tmp_path / "out").exists()
