"""The one exception type for input a user can fix, and how the scripts report it."""
import sys
from functools import wraps


class UserError(Exception):
    """Bad input (a file, a folder, an option) that the user can fix.

    The message is one line that names the file or option and says how to fix it; the
    command-line scripts print it without a traceback and exit with status 2.
    """


def exit_on_user_error(main):
    """Decorate a script's ``main`` so a :class:`UserError` becomes ``error: ...`` + exit 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
