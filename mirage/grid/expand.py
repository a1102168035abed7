"""Expand a runner command line into the grid of commands (nothing is run here).

A runner command line is ``BASE COMMAND [runner options] -- --option v1 v2 ... --flag``:

- before the first ``--``: the base command, with the runner's own options (``--runners``,
  ``--runner-*``) taken out wherever they appear (read in :mod:`mirage.grid.runner_options`);
- after it: each ``--option`` followed by values is one axis of a cartesian product, an
  option without values is a flag added to every command.

Every command is an argument list (never a shell string), so a value such as ``a b`` or
``$(rm -rf x)`` reaches the child exactly as typed. See ``docs/runner.md``.
"""
import collections
import functools
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import List, Tuple

from mirage.errors import UserError
from mirage.grid.runner_options import USAGE, is_runner_token, looks_like_option, parse_front


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
    base, options = parse_front(argv[:split])
    axes = _parse_axes(argv[split + 1:])
    return base, options, axes


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
