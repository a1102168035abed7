"""Options: defaults < YAML < command line, and the errors a user can hit."""
import pytest
import yaml

from mirage.config import build_parser, load_yaml, parse_config, per_domain, yaml_text
from mirage.options import OPTIONS
from mirage.option_checks import check_config
from mirage.errors import UserError

REQUIRED = ["--weights", "w/MIRAGE-Base.pth", "--data_path", "d/Duke_DME"]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg = write(tmp_path, "batch_size: 4\nlr: 1e-3\nloss: CEGDice\n")
    config, demo, path = parse_config(["-c", cfg, "--lr", "5e-4", *REQUIRED])
    assert config["batch_size"] == 4          # YAML over default (8)
    assert config["lr"] == 5e-4               # CLI over YAML
    assert config["loss"] == "CEGDice"
    assert config["epochs"] == 200            # built-in default
    assert not demo and path == cfg


def test_paper_config_values():
    config, _, _ = parse_config(["-c", "_cfgs/seg_200e_convnext.yaml", *REQUIRED])
    assert config["input_size"] == {"bscan": [1024, 1024]}
    assert config["patch_size"] == {"bscan": [32, 32]}
    expected = dict(batch_size=4, epochs=200, lr=1e-4, warmup_lr=0.0, min_lr=0.0,
                    warmup_epochs=1, layer_decay=0.75, loss="CEGDice", opt="adamw",
                    output_adapter="convnext", num_global_tokens=1, drop_path_encoder=0.1,
                    aug_name="simple", eval_freq=1, freeze_encoder=True)
    assert {k: config[k] for k in expected} == expected
    check_config(config)


def test_boolean_twins_and_sizes():
    config, _, _ = parse_config(["--no_fp16", "--no_freeze_encoder", "--input_size", "512",
                                 "768", "--patch_size", "16", *REQUIRED])
    assert config["fp16"] is False and config["freeze_encoder"] is False
    assert per_domain(config["input_size"], ["bscan"]) == {"bscan": (512, 768)}
    assert per_domain(config["patch_size"], ["bscan"]) == {"bscan": (16, 16)}
    config, _, _ = parse_config(["--fp16", *REQUIRED])
    assert config["fp16"] is True


def test_unknown_yaml_key_names_it_and_suggests(tmp_path):
    cfg = write(tmp_path, "batch_sise: 4\n")
    with pytest.raises(UserError, match="unknown option 'batch_sise'.*'batch_size'"):
        parse_config(["-c", cfg, *REQUIRED])


@pytest.mark.parametrize("text, match", [
    ("batch_size: four\n", "batch_size"),
    ("loss: Dice\n", "loss"),
    ("input_size: {bscan: [1024, 0]}\n", "input_size"),
    ("fp16: 3\n", "fp16"),
    ("[1, 2]\n", "mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_yaml_values(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_yaml(write(tmp_path, text))


def test_missing_config_file():
    with pytest.raises(UserError, match="file not found"):
        parse_config(["-c", "nope.yaml", *REQUIRED])


@pytest.mark.parametrize("argv, match", [
    ([], "--weights is required"),
    (["--weights", "w.pth"], "--data_path is required"),
    (["--input_size", "1000", "--patch_size", "32", *REQUIRED], "not divisible by --patch_size"),
    (["--batch_size", "0", *REQUIRED], "--batch_size must be at least 1"),
    (["--infer_only", *REQUIRED], "--infer_only needs --test"),
    (["--in_domains", "bscan-slo", *REQUIRED], "--in_domains"),
])
def test_bad_option_combinations(argv, match):
    config, _, _ = parse_config(argv)
    with pytest.raises(UserError, match=match):
        check_config(config)


def test_yaml_keys_can_hold_required_options(tmp_path):
    cfg = write(tmp_path, "weights: a/MIRAGE-Base.pth\ndata_path: d/AROI\n")
    config, _, _ = parse_config(["-c", cfg])
    check_config(config)
    assert config["weights"] == "a/MIRAGE-Base.pth"


def test_saved_config_reproduces_the_run(tmp_path):
    config, _, _ = parse_config(["--lr", "3e-4", "--input_size", "512", "768", *REQUIRED])
    saved = write(tmp_path, yaml_text(config))
    again, _, _ = parse_config(["-c", saved])
    assert again == config
    assert set(yaml.safe_load(yaml_text(config))) == {o.name for o in OPTIONS}


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-h"])
    text = capsys.readouterr().out
    for opt in OPTIONS:
        assert f"--{opt.name}" in text
        if opt.kind == "bool":
            assert f"--no_{opt.name}" in text
    assert "(default: 200)" in text and "-v VERSION" in text


def test_demo_layer_sits_under_user_options(tmp_path):
    config, demo, _ = parse_config(["--demo", "--epochs", "2"])
    assert demo and config["epochs"] == 2 and config["version"] == "demo"
