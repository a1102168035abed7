"""The command-line parser every tool of this package uses, so that all of them treat a
mistyped option the same way.

- No abbreviations (``--epoch 2`` is not ``--epochs 2``): YAML never accepted them, and an
  abbreviation that silently means one option today means another when an option is added.
- An unknown option is one line, ``error: unknown option --epoch (did you mean
  --epochs?); <prog> -h lists the options``, with the short usage line above it, never
  the whole help; exit status 2 like every other input error.
- The program name is the one the user typed (``run_seg_eval.py`` or the installed
  ``run_seg_eval``), so usage lines can be copied.
"""
import argparse
import difflib
import os
import sys


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

    def error(self, message):
        """Short usage line + ``error: ...; <prog> -h lists the options``; exit 2."""
        sys.stderr.write(self.short_usage())
        print(f"error: {message}; {self.prog} -h lists the options", file=sys.stderr,
              flush=True)
        sys.exit(2)
