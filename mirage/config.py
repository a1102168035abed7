"""Command-line options: built-in defaults < YAML config (``-c FILE``) < command line.

Every option is declared once, in the table of :mod:`mirage.options`; the argparse parser,
the YAML validation and the saved ``config.yaml`` are derived from it here. The protocol
(``--tuning`` and its older aliases) is resolved by :mod:`mirage.protocol`; the checks of
values against each other (``check_config``) are in :mod:`mirage.option_checks`.
"""
import argparse
import difflib
import math
import os
import sys
from pathlib import Path

import yaml

from mirage.argparsing import ArgumentParser
from mirage.errors import UserError
from mirage.options import ALL, OPTION_BY_NAME, OPTIONS, RUNTIME_OPTIONS
from mirage.protocol import resolve_tuning

RUN_CONFIG = "config.yaml"  # a run folder's options (mirage/run/folder.py names the rest)
CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: works installed
DEMO_CONFIG = CONFIGS / "demo.yaml"
DEMO_ROOT = Path("__demo")  # --demo writes its dataset and weights here
DEMO_DATASET = "Synth_OCT"
# Keys of the original MIRAGE tuning script's YAML files and options that this toolkit does
# not use: (the values that change nothing here, or None for any; why). Its own configs
# then load with one notice instead of an error; another value, or any other unknown key,
# is refused (a typo must not pass silently).
ORIGINAL_ONLY_KEYS = {
    "seg_reduce_zero_label": ((False,), "masks are read through the INFO.json class table, "
                                        "which names every value; no label is shifted"),
    "model": (None, "the model is chosen from the --weights file name (or --fm)"),
}


def demo_paths(root=DEMO_ROOT):
    """The demo's ``(weights path, dataset path)`` (which may not exist yet)."""
    return root / "weights" / "MIRAGE-Tiny.pth", root / "datasets" / DEMO_DATASET


# ----------------------------------------------------------------------------- values
def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(opt, value, where):
    """Check and convert a YAML or command-line value of ``opt``; UserError if invalid."""
    def fail(expected):
        raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected {expected}")

    if value is None:
        if opt.nullable:
            return None
        fail("a value (null is not allowed here)")
    kind = opt.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        fail("true or false")
    if isinstance(value, str) and not value.isascii():
        fail("ASCII digits" if kind in ("int", "float", "floats", "size", *OR_ALL)
             else "ASCII text")
    if kind in OR_ALL:
        return _coerce_or_all(opt, value, fail)
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        fail("an integer")
    if kind == "float":
        number = None
        if _is_number(value):
            number = float(value)
        elif isinstance(value, str):
            try:  # PyYAML reads 1e-4 (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            fail("a finite number")
        return number
    if kind == "floats":
        items = value if isinstance(value, (list, tuple)) else [value]
        try:
            if items and not any(isinstance(v, bool) or (isinstance(v, str) and
                                                         not v.isascii()) for v in items):
                numbers = [float(v) for v in items]
                if all(math.isfinite(v) for v in numbers):
                    return numbers
        except (TypeError, ValueError):
            pass
        fail("a list of finite numbers")
    if kind == "size":
        return _coerce_size(opt, value, where)
    if kind in ("str", "path"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            fail("a string")
        if opt.choices and value not in opt.choices:
            close = difflib.get_close_matches(value, opt.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"one of {', '.join(opt.choices)}{hint}")
        return value
    raise AssertionError(kind)


OR_ALL = {"count_or_all": "a whole number", "fraction_or_all": "a number in (0, 1]"}


def _coerce_or_all(opt, value, fail):
    """``all`` (any case) or a number: an int for ``count_or_all``, a float for
    ``fraction_or_all`` (its range is checked by check_config)."""
    if isinstance(value, str) and value.strip().lower() == ALL:
        return ALL
    if not isinstance(value, bool):
        try:
            if opt.kind == "count_or_all" and (isinstance(value, int) or
                                               isinstance(value, str)):
                return int(value)
            if opt.kind == "fraction_or_all" and isinstance(value, (int, float, str)):
                number = float(value)
                if math.isfinite(number):
                    return number
        except ValueError:
            pass
    fail(f"{OR_ALL[opt.kind]} or {ALL}")


def _coerce_size(opt, value, where):
    """int | [h, w] | {domain: int | [h, w]}  ->  the same, checked (ints > 0)."""
    def pair(v):
        if isinstance(v, str) and not v.isascii():
            raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected ASCII "
                            "digits")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if isinstance(v, str) and v.isascii() and v.isdigit() and int(v) > 0:
            return int(v)
        if isinstance(v, (list, tuple)) and len(v) in (1, 2):
            items = [pair(x) for x in v]
            if all(isinstance(x, int) for x in items):
                return items[0] if len(items) == 1 else items
        raise UserError(f"{where}: {opt.name} = {value!r} is not valid; expected a positive "
                        "int, [height, width], or a mapping {bscan: [height, width]}")

    if isinstance(value, dict):
        if not value:
            pair(None)
        return {str(domain): pair(v) for domain, v in value.items()}
    return pair(value)


def per_domain(value, domains):
    """Expand an int / [h, w] / {domain: ...} size to ``{domain: (h, w)}`` for ``domains``."""
    result = {}
    for domain in domains:
        v = value.get(domain) if isinstance(value, dict) else value
        if v is None:
            raise UserError(f"no size given for domain {domain!r} in {value!r}; add "
                            f"{domain}: [height, width]")
        result[domain] = (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    return result


# ----------------------------------------------------------------------------- parser
def build_parser():
    """The argparse parser; ``-h`` lists every option with its built-in default."""
    parser = ArgumentParser(
        prog="run_seg_tuning.py",
        description="Tune a segmentation decoder on a frozen retinal-OCT foundation model. "
                    "Precedence: built-in defaults < YAML config (-c) < command line.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="FILE.yaml",
                        help="YAML file with option values (keys = option names).")
    parser.add_argument("--demo", action="store_true",
                        help="Run the whole pipeline on a synthetic OCT dataset and a tiny "
                             "random MIRAGE-layout model (CPU, a few minutes, no download).")
    groups = {}
    for opt in OPTIONS:
        group = groups.get(opt.group) or groups.setdefault(
            opt.group, parser.add_argument_group(f"{opt.group} options"))
        flags = [f"--{opt.name}"] + ([opt.short] if opt.short else [])
        default = opt.default if opt.default not in ("", None) else "none"
        text = f"{opt.help} (default: {default})"
        if opt.kind == "bool":
            group.add_argument(*flags, dest=opt.name, action="store_const", const=True,
                               help=text)
            group.add_argument(f"--no_{opt.name}", dest=opt.name, action="store_const",
                               const=False, help=f"Disable --{opt.name}.")
        elif opt.kind in ("size", "floats"):
            group.add_argument(*flags, dest=opt.name, nargs="+", metavar="N", help=text)
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else opt.name.upper()
            group.add_argument(*flags, dest=opt.name, metavar=metavar, help=text)
    return parser


def load_yaml(path, what="--config"):
    """Read a YAML config into a checked ``{option: value}`` dict (``what``: the option that
    named the file, for messages)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {err.start}); save it as "
                        "UTF-8") from None
    except OSError as err:
        raise UserError(f"{what} {path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        first_line = str(err).splitlines()[0] if str(err) else "syntax error"
        raise UserError(f"{what} {path}: not valid YAML ({first_line})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path}: expected a mapping of option: value")
    values, unused = {}, []
    for key, value in raw.items():
        opt = OPTION_BY_NAME.get(str(key))
        if opt is None and str(key) in ORIGINAL_ONLY_KEYS:
            harmless, why = ORIGINAL_ONLY_KEYS[str(key)]
            if harmless is not None and value not in harmless:
                raise UserError(f"{what} {path}: {key}: {value!r} is not supported ({why}); "
                                f"remove the key or set it to {harmless[0]!r}")
            unused.append(str(key))
            continue
        if opt is None:
            close = difflib.get_close_matches(str(key), OPTION_BY_NAME, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{what} {path}: unknown option {key!r}{hint} "
                            "(run with -h for the list)")
        values[opt.name] = _coerce(opt, value, f"{what} {path}")
    if unused:
        print(f"note: {what} {path}: ignoring {', '.join(unused)}, of the original MIRAGE "
              "scripts, which this toolkit does not use ("
              + "; ".join(f"{key}: {ORIGINAL_ONLY_KEYS[key][1]}" for key in unused) + ")",
              file=sys.stderr)
    return values


def parse_config(argv=None):
    """Parse ``argv`` into ``(config dict of every option, demo flag, YAML path or None)``.

    Layers, each overriding the one before: built-in defaults, ``mirage/configs/demo.yaml``
    (with ``--demo``), the ``-c`` YAML file or the ``--run_dir`` run's own config.yaml, the
    command line.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(build_parser().parse_args(argv))
    demo = given.pop("demo", False)
    config_file = given.pop("config", None)
    if given.get("run_dir"):
        if demo or config_file:
            raise UserError(f"--run_dir {given['run_dir']}: its config.yaml gives the "
                            f"options; drop {'--demo' if demo else '-c/--config'}")
        _check_beside_run_dir(given["run_dir"], given)  # before a bad value is named
        config = run_dir_config(given["run_dir"], _command_line(given))
        return config, demo, Path(given["run_dir"]) / RUN_CONFIG
    layers = []  # (where, {option: value}) above the built-in defaults, lowest first
    if demo:
        layers.append(("--demo", load_yaml(DEMO_CONFIG)))
    if config_file:
        config_file = resolve_config_file(config_file)
        layers.append((f"--config {config_file}", load_yaml(config_file)))
    layers.append(("command line", _command_line(given)))
    return _merge(layers), demo, config_file


def _command_line(given):
    """The options given on the command line, checked and converted."""
    values = {}
    for name, value in given.items():
        opt = OPTION_BY_NAME[name]
        if opt.kind == "size" and len(value) > 2:
            raise UserError(f"--{name}: give one size or two (height width)")
        values[name] = _coerce(opt, value, "command line")
    return values


def _merge(layers):
    """Every option: the built-in defaults updated by each layer ``(where, values)`` in
    turn, the protocol resolved."""
    config = {opt.name: opt.default for opt in OPTIONS}
    for _, values in layers:
        config.update(values)
    resolve_tuning(config, layers)
    return config


def run_dir_config(run_dir, overrides=None, need_data=True):
    """Every option of a trained run folder: the defaults < its config.yaml < ``overrides``
    (``{option: value}``, only options that do not change what was trained), placed in
    that folder (its output root and version).

    The one way a run is read back from its folder (``--run_dir``, the predictor, the
    run spec's ``from_run_dir``). ``need_data``: the dataset it names must exist from here
    (not for predicting files, which needs only the weights).
    """
    overrides = dict(overrides or {})
    _check_beside_run_dir(run_dir, overrides)
    path = Path(run_dir) / RUN_CONFIG
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} not found; give <output>/<version>/"
                        "<dataset>/<run name>/ written by run_seg_tuning.py")
    if not path.is_file():
        raise UserError(f"{path} not found: no config.yaml there, so {run_dir} is not a run "
                        "folder; give <output>/<version>/<dataset>/<run name>/ written by "
                        "run_seg_tuning.py")
    config = _merge([(f"--run_dir {run_dir}", load_yaml(path, what="--run_dir")),
                     ("command line", {**overrides, "run_dir": str(run_dir)})])
    _place_in_run_dir(config, overrides, need_data)
    return config


def resolve_config_file(name):
    """``-c`` as given, or else the packaged config of that name (``seg_200e_convnext``,
    ``seg_200e_convnext.yaml`` or ``_cfgs/seg_200e_convnext.yaml`` from any folder)."""
    path = Path(name)
    if path.is_file():
        return name
    stem = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    packaged = CONFIGS / f"{stem}.yaml"
    if packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise UserError(f"--config {name}: file not found (configs shipped with the package: "
                    f"{shipped})")


def _check_beside_run_dir(run_dir, given):
    """Beside ``--run_dir`` only options that do not change what was trained."""
    training = sorted(name for name in given if name not in RUNTIME_OPTIONS)
    if training:
        raise UserError(f"--{training[0]} cannot be given with --run_dir: it changes what "
                        f"was trained; the run's value is in {Path(run_dir) / RUN_CONFIG} "
                        "(train a new run without --run_dir to change it)")


RUN_DIR_PATHS = ("weights", "data_path", "mapping_fn", "test_data_path")


def _place_in_run_dir(config, given, need_data=True):
    """Make the run folder the one ``--run_dir`` names (its output root and version), and
    check that the weights (and, with ``need_data``, the data) it names exist from here.

    config.yaml keeps paths as they were typed, often relative to the folder training ran
    in (``./__weights/...``); a relative path not found from here is looked up from that
    folder, which the run folder's place below the typed ``--base_output_dir`` gives.
    """
    run_dir = Path(config["run_dir"]).resolve()
    trained_in = _training_folder(run_dir, config["base_output_dir"])
    config["base_output_dir"] = str(run_dir.parent.parent.parent)
    config["version"] = run_dir.parent.parent.name
    for name in RUN_DIR_PATHS:
        value = config[name]
        if name in given or not value or Path(value).exists() or Path(value).is_absolute():
            continue
        if trained_in is not None and (trained_in / value).exists():
            config[name] = str(trained_in / value)
        elif name == "weights" or (need_data and name == "data_path"):
            raise UserError(f"--run_dir {config['run_dir']}: its {name} {value} is not found "
                            f"from {Path.cwd()}{f' or {trained_in}' if trained_in else ''}; "
                            f"give --{name} (the same file or folder, moved)")


def _training_folder(run_dir, base_output_dir):
    """The folder a run was trained from: ``run_dir`` is ``<there>/<base_output_dir as
    typed>/<version>/<dataset>/<name>``; None when the typed root is absolute or does not
    lead there."""
    base = Path(str(base_output_dir or ""))
    if base.is_absolute():
        return None
    parts = [p for p in Path(os.path.normpath(base)).parts if p != "."]
    root = run_dir.parent.parent.parent
    if ".." in parts or list(root.parts[len(root.parts) - len(parts):]) != parts:
        return None
    return Path(*root.parts[:len(root.parts) - len(parts)]) if parts else root


def domains_of(config):
    domains = [d for d in config["in_domains"].split("-") if d]
    if domains != ["bscan"]:
        raise UserError(f"--in_domains {config['in_domains']}: the benchmark layout provides "
                        "B-scans only; use --in_domains bscan")
    return domains


def yaml_text(config):
    """The options as YAML that ``-c`` reads back (reproduces the run)."""
    return yaml.safe_dump({opt.name: config[opt.name] for opt in OPTIONS},
                          sort_keys=False, default_flow_style=None)
