"""Read a runner command line and expand it into the grid of commands (nothing is run here).

A runner command line is ``BASE COMMAND [runner options] -- --option v1 v2 ... --flag``:

- before the first ``--``: the base command, with the runner's own options (``--runners``,
  ``--runner-*``) taken out wherever they appear;
- after it: each ``--option`` followed by values is one axis of a cartesian product, an
  option without values is a flag added to every command.

Every command is an argument list (never a shell string), so a value such as ``a b`` or
``$(rm -rf x)`` reaches the child exactly as typed. See ``docs/runner.md``.
"""
import collections
import difflib
import functools
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

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


@dataclass
class Axis:
    """One option after ``--``: its values (empty for a flag).

    ``inline`` is true for ``--option=value``, which is passed on as that single token.
    """

    option: str
    values: List[str]
    inline: bool = False

    @property
    def name(self):
        return self.option.lstrip("-")


@dataclass
class Job:
    """One command of the grid. ``index`` counts from 1 in grid order."""

    index: int
    command: List[str]
    choice: Tuple[Tuple[str, str], ...]  # (option, value) of every axis with values
    name: str  # short file-name-safe label made of the values that differ between jobs


# Counting what --runner-filter leaves tracks one entry per distinct set of filter values a
# partial combination holds: a few for ordinary filters. Past this many steps (about a
# second), the filters are too intricate to count that way.
MAX_FILTER_WORK = 2_000_000


class Grid:
    """A parsed command line: base command, runner options and axes.

    ``num_combinations`` is computed, not counted, :meth:`count_jobs` counts what the
    filters leave without listing it, and :meth:`iter_jobs` expands the product lazily, so
    a huge grid can be sized and listed (``--runner-info``) without holding it in memory;
    ``jobs`` is the full list, for running (only under the runner's job limit).
    """

    def __init__(self, base, options, axes):
        self.base = base
        self.options = options
        self.axes = axes
        self.num_combinations = math.prod(len(a.values) for a in axes if a.values)

    def iter_jobs(self):
        """The jobs in grid order (first axis slowest), filtered, one at a time."""
        names = {axis.name for axis in self.axes}
        value_axes = [axis for axis in self.axes if axis.values]
        varying = {axis.option for axis in value_axes if len(axis.values) > 1}
        index = 0
        for combo in itertools.product(*[[(a.option, v) for v in a.values]
                                         for a in value_axes]):
            if _is_filtered(combo, self.options.filters, names):
                continue
            chosen = dict(combo)
            command = list(self.base)
            for axis in self.axes:
                if not axis.values:
                    command.append(axis.option)
                elif axis.inline:
                    command.append(f"{axis.option}={chosen[axis.option]}")
                else:
                    command.extend([axis.option, chosen[axis.option]])
            index += 1
            yield Job(index, command, tuple(combo), _job_name(combo, varying))

    @functools.cached_property
    def jobs(self):
        return list(self.iter_jobs())

    def count_jobs(self):
        """The number of commands: the combinations the filters leave, counted axis by axis
        without listing them; None when the filters are too intricate to count that way.

        A partial combination is known by the set of filter values it already holds (a
        bit mask) and how many prefixes share it; one that holds a whole group is dropped
        with all its extensions, as values only ever add to the set.
        """
        if not self.options.filters:
            return self.num_combinations
        names = {axis.name for axis in self.axes}
        items = [item for group in self.options.filters for item in group]
        groups, bit = [], 0
        for group in self.options.filters:
            groups.append(((1 << len(group)) - 1) << bit)
            bit += len(group)
        states = {0: 1}  # filter values held (bit mask) -> number of partial combinations
        work = 0
        for axis in (axis for axis in self.axes if axis.values):
            # values that hold the same filter values count alike: one step for all of them
            masks = collections.Counter(
                sum(1 << i for i, item in enumerate(items)
                    if _item_matches(item, axis.option, value, names))
                for value in axis.values)
            work += len(states) * len(masks) * len(groups)
            if work > MAX_FILTER_WORK:
                return None
            merged = {}
            for held, count in states.items():
                for mask, values in masks.items():
                    now = held | mask
                    if not any(now & group == group for group in groups):
                        merged[now] = merged.get(now, 0) + count * values
            states = merged
        return sum(states.values())

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


def parse_command_line(argv):
    """Split ``argv`` into (base command, RunnerOptions, axes). Raises UserError."""
    argv = list(argv)
    if not argv:
        raise UserError("no command given; " + USAGE.splitlines()[0].replace("usage: ", "write "))
    if "--" not in argv:
        raise UserError(
            "no '--' on the command line: write the base command, then '--', then the options "
            "to vary, e.g. ./runner python run_seg_tuning.py -- --weights a.pth b.pth"
        )
    split = argv.index("--")
    base, options = _parse_front(argv[:split])
    axes = _parse_axes(argv[split + 1:])
    return base, options, axes


def _parse_front(tokens):
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


def _parse_axes(tokens):
    """Tokens after ``--`` -> axes in the order given."""
    axes, by_option = [], {}
    current = None
    for token in tokens:
        if token == "--":
            raise UserError("'--' appears twice; the runner splits the command line at the "
                            "first one only")
        if is_runner_token(token):
            raise UserError(f"runner option {token.partition('=')[0]} must come before '--' "
                            "(everything after '--' is varied and passed to the command)")
        if looks_like_option(token):
            option, has_inline, value = token.partition("=")
            if not option.startswith("--"):
                option, has_inline = token, ""  # "-c" style: no '=' form
            if option in by_option:
                raise UserError(f"option {option} is given twice after '--'; list all its "
                                f"values once: {option} v1 v2 ...")
            current = Axis(option, [value] if has_inline else [], inline=bool(has_inline))
            by_option[option] = current
            axes.append(current)
            continue
        if current is None:
            raise UserError(f"'{token}' right after '--' belongs to no option; values follow "
                            "an option, e.g. -- --weights a.pth b.pth")
        if current.inline:
            raise UserError(f"'{token}' follows {current.option}={current.values[0]}; to vary "
                            f"it write {current.option} {current.values[0]} {token}")
        if token in current.values:
            raise UserError(f"value '{token}' is listed twice for {current.option}; the two "
                            "jobs would be identical, list it once")
        current.values.append(token)
    return axes


def _short_value(value):
    """The part of a value that names it: the last path component for paths."""
    stripped = value.rstrip("/")
    return os.path.basename(stripped) or value


def _item_matches(item, option, value, axis_names):
    """A filter item matches a chosen value by the value itself, its last path component,
    or, written ``option=value``, only that option's value."""
    key, has_eq, rest = item.partition("=")
    if has_eq and key.lstrip("-") in axis_names:
        if key.lstrip("-") != option.lstrip("-"):
            return False
        item = rest
    return item == value or item == _short_value(value)


def _check_filters(filters, axes):
    """A filter value that matches nothing in the grid is a typo, not a no-op."""
    names = {axis.name for axis in axes}
    pairs = [(axis.option, value) for axis in axes for value in axis.values]
    for group in filters:
        for item in group:
            if not any(_item_matches(item, opt, val, names) for opt, val in pairs):
                shown = ", ".join(sorted({_short_value(v) for _, v in pairs})[:12]) or "none"
                raise UserError(f"--runner-filter value '{item}' matches no value of the grid "
                                f"(values: {shown}); check the spelling")


def _is_filtered(choice, filters, axis_names):
    return any(
        all(any(_item_matches(item, opt, val, axis_names) for opt, val in choice)
            for item in group)
        for group in filters
    )


def _job_name(choice, varying_options):
    """File-name-safe label from the values that differ between jobs, e.g. ``Base.pth_AROI``."""
    parts = [_short_value(value) for option, value in choice if option in varying_options]
    name = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in parts)
    return name[:80] or "job"


def expand(base, options, axes):
    """The grid of the axes' cartesian product, minus the filtered combinations.

    The first axis varies slowest. A flag (axis without values) is in every command;
    ``--option=value`` stays one token. Checks the filters; the jobs are made on demand.
    """
    _check_filters(options.filters, axes)
    return Grid(base, options, axes)


def build_grid(argv):
    """Parse and expand a runner command line (``argv`` without the program name)."""
    base, options, axes = parse_command_line(argv)
    return expand(base, options, axes)
