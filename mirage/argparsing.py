"""The command-line parser every tool of this package uses, so that all of them treat a
mistyped option the same way.

- No abbreviations (``--epoch 2`` is not ``--epochs 2``): YAML never accepted them, and an
  abbreviation that silently means one option today means another when an option is added.
- An unknown option is one line, ``error: unknown option --epoch (did you mean
  --epochs?); <prog> -h lists the options``, with the short usage line above it, never
  the whole help; exit status 2 like every other input error.
- The program name is the one the user typed (``run_seg_eval.py`` or the installed
  ``run_seg_eval``), so usage lines can be copied.
- A negative number after an option (``--min_lr -1e-3``) looks like an option to argparse,
  which then says only that ``--min_lr`` expected an argument; the error says instead
  how to write it: ``--min_lr: a negative value must be written --min_lr=-1e-3``.
"""
import argparse
import difflib
import os
import re
import sys

# argparse's "argument --a/--b: expected one argument" (or "at least one", "2 arguments").
_EXPECTED_ARGUMENT = re.compile(r"^argument (\S+): expected .*arguments?$")


def _is_negative_number(token):
    """``-1e-3``, ``-0.5``, ``-inf``: what argparse takes for an option (unless it is a
    plain ``-2`` or ``-.5``, which it reads as a value)."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def program_name(default):
    """The name the tool was called by (the script or the installed command)."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not called or called in ("-", "-c", "-m", "__main__.py", "python", "python3") \
            or called.startswith(("pytest", "ipykernel")):
        return default
    return called


def suggestion(name, candidates):
    """`` (did you mean --x?)`` for the candidate closest to ``name``, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations, with one-line errors and option suggestions."""

    def __init__(self, *args, prog=None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, prog=program_name(prog) if prog else None, **kwargs)

    def option_names(self):
        return [flag for action in self._actions for flag in action.option_strings]

    def parse_known_args(self, args=None, namespace=None):
        # Kept for error(): argparse's messages do not show the value that was refused.
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            options = [u for u in unknown if u.startswith("-") and u != "-"]
            if options:
                name = options[0].split("=", 1)[0]
                self.error(f"unknown option {name}{suggestion(name, self.option_names())}")
            self.error(f"unexpected argument {unknown[0]!r}")
        return parsed

    def short_usage(self):
        """argparse's usage line when it is short, else ``usage: <prog> [options]``."""
        usage = self.format_usage()
        return usage if usage.count("\n") <= 3 else f"usage: {self.prog} [options]\n"

    def negative_value_hint(self, message):
        """``--x: a negative value must be written --x=-1e-3`` when argparse's ``message``
        says that option ``--x`` expected an argument and the command line gives it a
        negative number; else None."""
        expected = _EXPECTED_ARGUMENT.match(message)
        if not expected:
            return None
        flags = set(expected.group(1).split("/"))
        given = [str(token) for token in getattr(self, "_given", [])]
        for flag, value in zip(given, given[1:]):
            if flag in flags and _is_negative_number(value):
                return f"{flag}: a negative value must be written {flag}={value}"
        return None

    def error(self, message):
        """Short usage line + ``error: ...; <prog> -h lists the options``; exit 2."""
        message = self.negative_value_hint(message) or message
        sys.stderr.write(self.short_usage())
        print(f"error: {message}; {self.prog} -h lists the options", file=sys.stderr,
              flush=True)
        sys.exit(2)
