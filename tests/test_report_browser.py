"""The reports open in a real browser (headless Chromium) with no console error.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``), so
no Python package is needed: console messages, uncaught exceptions and failed loads
(``Log.entryAdded``, e.g. a missing image) are collected while each page loads, and every
image is checked to have decoded. Chromium comes from the OS packages (``.ci/run`` installs
it with ``apt-get install chromium``); where it cannot be installed these tests are skipped.
"""
import base64
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from test_study import make_grid, make_wide_grid

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 60


def find_browser():
    explicit = os.environ.get("MIRAGE_TEST_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class Browser:
    """One headless Chromium; ``load(url)`` returns what a user's console would show."""

    def __init__(self, executable, profile):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds():  # Chromium reads commands on fd 3 and writes replies to fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=wire_fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)

    def _send(self, message):
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, session=False, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def load(self, url):
        """Open ``url``; returns (problems: [text], images: int, broken images: int)."""
        self.events = []
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive(deadline))
        counts = self.call("Runtime.evaluate", session=True, returnByValue=True, expression=(
            "JSON.stringify([document.images.length, Array.from(document.images)"
            ".filter(i => !i.complete || i.naturalWidth === 0).length])"))
        images, broken = json.loads(counts["result"]["value"])
        return self._problems(), images, broken

    def value(self, expression):
        """The JSON-able value of a JavaScript expression in the loaded page."""
        reply = self.call("Runtime.evaluate", session=True, returnByValue=True,
                          expression=expression)
        return reply["result"].get("value")

    def set_width(self, width, height=900):
        """Lay pages out as on a screen ``width`` CSS pixels wide (scale 1)."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    def screenshot(self, path):
        """Save the whole page (beyond the viewport) as a PNG; returns its bytes."""
        data = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)["data"]
        png = base64.b64decode(data)
        path.write_bytes(png)
        return png

    def _problems(self):
        problems = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in (
                    "error", "assert", "warning"):
                args = " ".join(str(a.get("value", a.get("description", "")))
                                for a in params.get("args", []))
                problems.append(f"console.{params['type']}: {args}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                problems.append(f"exception: {text}")
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error",
                                                                                 "warning"):
                entry = params["entry"]
                problems.append(f"{entry.get('source')}: {entry.get('text')} "
                                f"{entry.get('url', '')}")
        return problems

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_browser()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian/Ubuntu: apt-get install chromium; "
                    ".ci/run installs it), so the reports cannot be opened in a browser")
    try:
        instance = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    except (OSError, RuntimeError, TimeoutError) as err:
        pytest.skip(f"Chromium ({executable}) could not be started headless: {err}")
    yield instance
    instance.close()


def test_the_harness_sees_console_errors_and_broken_images(browser, tmp_path):
    # Without this, "no errors" below could mean "not listening".
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title>'
                    '</head><body><img alt="gone" src="missing.png">'
                    '<script>console.error("boom"); undefinedFunction();</script>'
                    "</body></html>")
    problems, images, broken = browser.load(page.as_uri())
    assert (images, broken) == (1, 1)
    assert any("boom" in p for p in problems)
    assert any("undefinedFunction" in p for p in problems)
    assert any("missing.png" in p for p in problems)


def test_run_and_grid_reports_render_without_console_errors(browser, tmp_path):
    from mirage.report.run_report import write_run_report
    from mirage.report.study_outputs import write_study
    _, output, runs = make_grid(tmp_path)
    write_run_report(runs[("MIRAGE-Tiny", 1)])
    files = write_study([output], tmp_path / "study", quiet=True, run_reports="none")
    # heat maps and the boundary box plot; the run's box plots, boundary box plot, gallery
    # and curves
    for path, expected_images in ((files["report.html"], 4),
                                  (runs[("MIRAGE-Tiny", 1)] / "report.html", 7)):
        problems, images, broken = browser.load(path.as_uri())
        assert problems == [], f"{path}: {problems}"
        assert (images, broken) == (expected_images, 0), path


# Where each p-value cell, each table and each image ends, and how wide the page scrolls.
LAYOUT_JS = """JSON.stringify((() => {
  const right = el => el.getBoundingClientRect().right;
  const table = document.getElementById("significance-table");
  const pCells = table ? Array.from(table.querySelectorAll("td.p")) : [];
  return {pCells: pCells.length, pRight: Math.max(0, ...pCells.map(right)),
          tablesRight: Math.max(0, ...Array.from(document.querySelectorAll("table")).map(right)),
          imagesRight: Math.max(0, ...Array.from(document.images).map(right)),
          scrollWidth: document.documentElement.scrollWidth};
})())"""


def test_a_six_by_six_study_report_fits_a_1280_pixel_screen(browser, tmp_path):
    from mirage.report.study_outputs import write_study
    _, output = make_wide_grid(tmp_path)
    files = write_study([output], tmp_path / "study", quiet=True, run_reports="none")
    browser.set_width(1280)
    try:
        problems, images, broken = browser.load(files["report.html"].as_uri())
        layout = json.loads(browser.value(LAYOUT_JS))
        png = browser.screenshot(tmp_path / "study_1280.png")
    finally:
        browser.call("Emulation.clearDeviceMetricsOverride", session=True)
    assert problems == [] and broken == 0 and images == 3 + 6  # heat maps, boundary plots
    assert png.startswith(b"\x89PNG")
    # 15 model pairs x 6 datasets + pooled, per class group: every p-value in view
    assert layout["pCells"] >= 2 * 15 * 7
    assert layout["pRight"] <= 1280, layout
    assert layout["tablesRight"] <= 1280 and layout["imagesRight"] <= 1280, layout
    assert layout["scrollWidth"] <= 1280, layout
