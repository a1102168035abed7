"""Progress bars: tqdm's live bar on a terminal, plain lines anywhere else.

Every long loop of the package makes its bar with :func:`progress` (the arguments are
tqdm's). When the bar's stream (stderr unless ``file=``) is a terminal, the bar is tqdm's
own, unchanged: one line redrawn in place with ``\\r``. When it is not (a file, a pipe,
the runner's job logs, CI), each redraw would stay in the output, so the bar writes
plain lines instead, never a ``\\r``: one line at most every ``PLAIN_INTERVAL_S`` seconds
(``TQDM_MININTERVAL``, tqdm's own variable for the least time between two redraws, when
it is set: the runner sets it for its job logs), and the final line when the bar closes.
A bar that ran less than the interval writes its final line only, and tqdm's
``delay`` (``TQDM_DELAY``) still holds back a bar until it has run that long.
``tqdm.write`` works beside either kind (it clears and redraws tqdm's bars; a plain
bar has nothing to clear and redraws only when a line is due).
"""
import os
import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # outside a terminal: the least time between two progress lines
INTERVAL_ENV = "TQDM_MININTERVAL"  # overrides it (also tqdm's own redraw interval)


def progress(iterable=None, **tqdm_kwargs):
    """A progress bar over ``iterable`` (or ``total=``, updated by hand), with tqdm's
    arguments: a plain tqdm bar on a terminal, else a :class:`PlainProgress` writing
    lines at most every :func:`plain_interval` seconds (tqdm's ``mininterval`` is for
    the terminal only)."""
    stream = tqdm_kwargs.get("file") or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, **tqdm_kwargs)
    return PlainProgress(iterable, **{**tqdm_kwargs, "mininterval": plain_interval()})


def is_terminal(stream):
    """Whether ``stream`` is an open terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def plain_interval():
    """Seconds between two progress lines outside a terminal: ``TQDM_MININTERVAL`` if it
    is set to a number, else ``PLAIN_INTERVAL_S``."""
    try:
        return max(0.0, float(os.environ[INTERVAL_ENV]))
    except (KeyError, ValueError):
        return PLAIN_INTERVAL_S


class PlainProgress(tqdm):
    """tqdm for a stream that is not a terminal: each redraw is a whole line, at most one
    every ``mininterval`` seconds, and the bar's final line at close; no ``\\r``, no
    cursor movement, nothing to clear.

    A transient bar (``leave=False``, which vanishes from a terminal) writes its final
    line only if it wrote a progress line before: a short transient bar (one validation
    pass, a dataset check) leaves nothing in the log, where one line per pass would add
    up to clutter beside the summary line printed after it, while a long one that showed
    its progress ends with the line saying it finished, not with a stale 40%.
    """

    def __iter__(self):
        self._plain_iterating = True
        return super().__iter__()

    def update(self, n=1):
        self._plain_updating = True
        try:
            return super().update(n)
        finally:
            self._plain_updating = False

    def display(self, msg=None, pos=None):
        """Write the bar as one line when one is due; positions are ignored (a log has no
        cursor to move), clearing (``msg=""``) writes nothing."""
        if msg == "" or not hasattr(self, "start_t"):
            return False  # a clear, or tqdm's draw as it starts: no line at 0%
        if getattr(self, "_plain_iterating", False) and \
                not getattr(self, "_plain_updating", False):
            # a redraw asked for inside ``for x in bar`` (set_postfix, tqdm.write): tqdm
            # counts the loop's items aside and updates ``n`` only when it redraws itself,
            # so this line would show a stale count; the loop's own redraw comes in time
            return False
        now = self._time()
        last = getattr(self, "_plain_shown", None)
        if now - (self.start_t if last is None else last) < self.mininterval or \
                now < self.start_t + self.delay:
            return False
        self._plain_shown = now
        return self._write_line(self.__str__() if msg is None else msg)

    def clear(self, nolock=False):
        """Nothing on screen to clear: the lines written stay."""

    def close(self):
        """Stop the bar; write its final line (see the class: transient bars only if they
        showed progress before; none before tqdm's ``delay`` has passed)."""
        if getattr(self, "disable", True):
            return
        self.disable = True
        self._decr_instances(self)
        if not hasattr(self, "start_t"):
            return
        leave = abs(self.pos) == 0 if self.leave is None else self.leave
        shown = getattr(self, "_plain_shown", None) is not None
        ran = self._time() >= self.start_t + self.delay
        if (leave and ran) or shown:
            self._ema_dt = lambda: None  # the overall rate, as tqdm's own last line
            with self._lock:
                self._write_line(self.__str__())

    def _write_line(self, text):
        try:
            self.fp.write(text.replace("\r", " ").rstrip() + "\n")
            getattr(self.fp, "flush", lambda: None)()
        except ValueError:  # the stream was closed under the bar: nothing to show it on
            return False
        return True
