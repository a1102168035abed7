"""The runner's own options: read from the command line before ``--``, and the usage text.

The part of a runner command line before the first ``--`` is the base command with the
runner's options (``--runners``, ``--runner-*``, also written with underscores) taken out
wherever they appear: :func:`parse_front` returns the base command and the
:class:`RunnerOptions`, checked alone and against each other (e.g. the ``--runner-slurm-*``
options only with ``--runner-slurm``). Also here: the values of those options (GPU lists,
durations, SLURM time limits, filter groups) and ``./runner --runner-status DIR``. The
grid itself is expanded in :mod:`mirage.grid.expand`. See ``docs/runner.md``.
"""
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

from mirage.argparsing import program_name
from mirage.errors import UserError

USAGE = (
    "usage: ./runner BASE COMMAND [runner options] -- --option v1 v2 ... [--flag]\n"
    "  e.g. ./runner python run_seg_tuning.py --runners 2 -- --config cfg.yaml "
    "--weights a.pth b.pth --data_path d1/ d2/\n"
    "runner options (before '--'):\n"
    "  --runners N              jobs run at the same time (default 1, or one per GPU)\n"
    "  --runner-info            print the commands and run nothing\n"
    "  --runner-filter G [G..]  drop every combination that holds all values of a group\n"
    "                           G = v1,v2,... (a value may be written option=value)\n"
    "  --runner-gpus 0,1,..     give each job one free GPU via CUDA_VISIBLE_DEVICES\n"
    "  --runner-log DIR         folder for one log file per job\n"
    "                           (default __output/runner/<date-time>)\n"
    "  --runner-retry K         run a failed command up to K more times\n"
    "                           (not one that exited with 2: a user error)\n"
    "  --runner-timeout T       stop a job (its whole process group) after T seconds\n"
    "                           (T: seconds, or a number with s/m/h/d, e.g. 90m, 12h)\n"
    "  --runner-slurm           submit the grid as a SLURM job array through submitit\n"
    "  --runner-slurm-time T    time limit per job: minutes or [D-]HH:MM[:SS] (required)\n"
    "  --runner-slurm-partition P, --runner-slurm-gpus G (default 1),\n"
    "  --runner-slurm-cpus C, --runner-slurm-mem GB, --runner-slurm-account A\n"
    "  --runner-slurm-requeue   let SLURM requeue a task after a node failure or preemption\n"
    "                           (training resumes from its last checkpoint)\n"
    "  --runner-detach          with --runner-slurm: submit and return without waiting\n"
    "(runner options may also be written with underscores: --runner_gpus)\n"
    "./runner --runner-status DIR: the state of a grid submitted with --runner-slurm\n"
    "                           (DIR: its --runner-log folder)\n"
    "full documentation: docs/runner.md"
)



def usage_text():
    """USAGE with the command named as it was called (``./runner`` or ``mirage_runner``)."""
    name = program_name("./runner")
    return USAGE if name == "runner" else USAGE.replace("./runner", name)


@dataclass
class RunnerOptions:
    """The runner's own options, taken from the part of the command line before ``--``."""

    runners: Optional[int] = None  # None: one per GPU slot with --runner-gpus, else 1
    info: bool = False
    filters: List[List[str]] = field(default_factory=list)  # groups of values
    gpus: Optional[List[int]] = None  # GPU slots; an id listed twice runs two jobs on it
    log_dir: Optional[str] = None
    retry: int = 0
    timeout_s: Optional[float] = None  # per job, local and in each SLURM array task
    slurm: bool = False
    slurm_time_min: Optional[int] = None
    slurm_partition: Optional[str] = None
    slurm_gpus: int = 1
    slurm_cpus: Optional[int] = None
    slurm_mem_gb: Optional[int] = None
    slurm_account: Optional[str] = None
    slurm_requeue: bool = False
    detach: bool = False


# Runner option -> the kind of value it takes.
_FLAG, _INT, _TEXT, _GROUPS = "flag", "int", "text", "groups"
RUNNER_OPTIONS = {
    "--runners": _INT,
    "--runner-info": _FLAG,
    "--runner-filter": _GROUPS,
    "--runner-gpus": _TEXT,
    "--runner-log": _TEXT,
    "--runner-retry": _INT,
    "--runner-timeout": _TEXT,
    "--runner-slurm": _FLAG,
    "--runner-slurm-time": _TEXT,
    "--runner-slurm-partition": _TEXT,
    "--runner-slurm-gpus": _INT,
    "--runner-slurm-cpus": _INT,
    "--runner-slurm-mem": _INT,
    "--runner-slurm-account": _TEXT,
    "--runner-slurm-requeue": _FLAG,
    "--runner-detach": _FLAG,
    "--runner-status": _TEXT,  # used alone: ./runner --runner-status DIR (see status_folder)
}
_SLURM_ONLY = [
    "--runner-slurm-time", "--runner-slurm-partition", "--runner-slurm-gpus",
    "--runner-slurm-cpus", "--runner-slurm-mem", "--runner-slurm-account",
    "--runner-slurm-requeue", "--runner-detach",
]

# "-x" / "--xyz" start an option; "-1", "-0.5" and a lone "-" are values.
_OPTION_RE = re.compile(r"^--?[A-Za-z_]")


def looks_like_option(token):
    return bool(_OPTION_RE.match(token))


def is_runner_token(token):
    """Every token starting with ``--runner`` is reserved for the runner (typos included)."""
    return token.startswith("--runner")


def parse_front(tokens):
    """Take the runner options out of the tokens before ``--``; the rest is the base command."""
    base, seen, opts = [], set(), RunnerOptions()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not is_runner_token(token):
            base.append(token)
            continue
        name, has_inline, inline = token.partition("=")
        # Every other tool spells options with underscores: --runner_gpus is --runner-gpus.
        name = name.replace("_", "-")
        kind = RUNNER_OPTIONS.get(name)
        if kind is None:
            raise UserError(f"unknown runner option '{name}'{_did_you_mean(name)}; "
                            "run ./runner --help for the list")
        if name in seen and kind != _GROUPS:
            raise UserError(f"runner option {name} is given twice; keep one")
        seen.add(name)
        if kind == _FLAG:
            if has_inline:
                raise UserError(f"runner option {name} takes no value; remove '={inline}'")
            _set_option(opts, name, True)
            continue
        if kind == _GROUPS:
            # Greedy, like argparse nargs='+': every following token up to the next option.
            groups = [inline] if has_inline else []
            while i < len(tokens) and tokens[i] != "--" and not looks_like_option(tokens[i]):
                groups.append(tokens[i])
                i += 1
            if not groups:
                raise UserError(f"runner option {name} needs at least one group, e.g. {name} a,b")
            opts.filters.extend(_parse_filter_group(g) for g in groups)
            continue
        if has_inline:
            value = inline
        elif i < len(tokens):
            value = tokens[i]
            i += 1
        else:
            raise UserError(f"runner option {name} needs a value")
        _set_option(opts, name, _int_value(name, value) if kind == _INT else value)
    _check_options(opts, seen)
    if not base:
        raise UserError("no base command before '--': write the program to run first, "
                        "e.g. ./runner python run_seg_tuning.py -- --weights a.pth b.pth")
    return base, opts


def _did_you_mean(name):
    close = difflib.get_close_matches(name, RUNNER_OPTIONS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _int_value(name, text):
    # ASCII digits only: int() also reads '٣' or fullwidth digits, surely not what was meant.
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text, flags=re.ASCII):
        raise UserError(f"runner option {name} needs a whole number, got '{text}'")
    return int(text)


def _set_option(opts, name, value):
    if name == "--runners":
        if value < 1:
            raise UserError(f"--runners must be at least 1, got {value}")
        opts.runners = value
    elif name == "--runner-info":
        opts.info = True
    elif name == "--runner-gpus":
        opts.gpus = parse_gpu_list(value)
    elif name == "--runner-log":
        if not value:
            raise UserError("--runner-log needs a folder name")
        opts.log_dir = value
    elif name == "--runner-retry":
        if value < 0:
            raise UserError(f"--runner-retry must be 0 or more, got {value}")
        opts.retry = value
    elif name == "--runner-timeout":
        opts.timeout_s = parse_duration(value)
    elif name == "--runner-slurm":
        opts.slurm = True
    elif name == "--runner-slurm-time":
        opts.slurm_time_min = parse_slurm_time(value)
    elif name == "--runner-slurm-partition":
        opts.slurm_partition = value
    elif name == "--runner-slurm-gpus":
        if value < 0:
            raise UserError(f"--runner-slurm-gpus must be 0 or more, got {value}")
        opts.slurm_gpus = value
    elif name == "--runner-slurm-cpus":
        if value < 1:
            raise UserError(f"--runner-slurm-cpus must be at least 1, got {value}")
        opts.slurm_cpus = value
    elif name == "--runner-slurm-mem":
        if value < 1:
            raise UserError(f"--runner-slurm-mem (GB) must be at least 1, got {value}")
        opts.slurm_mem_gb = value
    elif name == "--runner-slurm-account":
        opts.slurm_account = value
    elif name == "--runner-slurm-requeue":
        opts.slurm_requeue = True
    elif name == "--runner-detach":
        opts.detach = True
    elif name == "--runner-status":
        raise UserError("--runner-status is used alone: ./runner --runner-status DIR, DIR "
                        "being the --runner-log folder of a grid submitted with --runner-slurm")


def _check_options(opts, seen):
    """Options that only make sense together."""
    if not opts.slurm:
        extra = [name for name in _SLURM_ONLY if name in seen]
        if extra:
            raise UserError(f"runner option {extra[0]} only applies with --runner-slurm; "
                            "add --runner-slurm or remove it")
        return
    if opts.gpus is not None:
        raise UserError("--runner-gpus is for local runs; with --runner-slurm use "
                        "--runner-slurm-gpus N (GPUs per job)")
    if opts.slurm_time_min is None:
        raise UserError("--runner-slurm needs --runner-slurm-time (minutes or [D-]HH:MM[:SS], "
                        "e.g. 12:00:00): submitit's default would stop jobs after 5 minutes")


def status_folder(argv):
    """The folder of ``./runner --runner-status DIR`` (also ``--runner-status=DIR``), or
    None when ``argv`` is an ordinary runner command line."""
    if not argv or argv[0].partition("=")[0].replace("_", "-") != "--runner-status":
        return None
    name, has_inline, inline = argv[0].partition("=")
    rest = ([inline] if has_inline else []) + list(argv[1:])
    if len(rest) != 1 or not rest[0]:
        raise UserError("--runner-status takes one folder: the --runner-log folder of a grid "
                        "submitted with --runner-slurm, e.g. ./runner --runner-status "
                        "__output/runner/train_v1")
    return rest[0]


def parse_gpu_list(text):
    """``"0,1,1"`` -> [0, 1, 1]; an id listed twice gives that GPU two job slots."""
    items = [item.strip() for item in text.split(",")]
    # isdigit alone would accept non-ASCII digits such as '١', which int() then reads as 1.
    if not text.strip() or any(not (item.isascii() and item.isdigit()) for item in items):
        raise UserError(f"--runner-gpus takes GPU ids separated by commas, e.g. 0,1,2,3; "
                        f"got '{text}'")
    return [int(item) for item in items]


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """``--runner-timeout`` value -> seconds: ``3600``, ``90s``, ``90m``, ``12h``, ``1.5d``."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)", text.strip(),
                         flags=re.ASCII)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)] if match else 0.0
    if not match or not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--runner-timeout takes a positive time in seconds, or a number "
                        f"with s/m/h/d (e.g. 3600, 90m, 12h); got '{text}'")
    return seconds


def parse_slurm_time(text):
    """SLURM-style time limit -> whole minutes (rounded up).

    Accepts ``MINUTES``, ``HH:MM``, ``HH:MM:SS`` and ``D-HH[:MM[:SS]]``.
    """
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip(),
                         flags=re.ASCII)
    if not match:
        raise UserError(f"--runner-slurm-time takes minutes or [D-]HH:MM[:SS], got '{text}'")
    days, first, second, third = match.groups()
    if days is None and second is None:
        minutes = int(first)  # a bare number is minutes, as in sbatch --time
    else:
        hours, mins, secs = int(first), int(second or 0), int(third or 0)
        minutes = int(days or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes < 1:
        raise UserError(f"--runner-slurm-time must be at least one minute, got '{text}'")
    return minutes


def _parse_filter_group(text):
    items = text.split(",")
    if any(item == "" for item in items):
        raise UserError(f"--runner-filter group '{text}' has an empty value; write values "
                        "separated by single commas, e.g. MIRAGE-Large.pth,AROI")
    return items
