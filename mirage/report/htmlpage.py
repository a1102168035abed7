"""Static, self-contained HTML pages: inline CSS, images as base64 PNG, no script, no network.

    page(title, sections)       -> the whole document as text
    table(frame, bold=...)      -> an HTML table of a DataFrame
    image(png_bytes, alt)       -> <img> with the PNG inside (data: URI)
    write_page(path, text)      -> atomic write that never replaces a file we did not write
"""
import base64
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mirage.errors import UserError
from mirage.fileio import write_text

GENERATOR = "mirage-seg-report"  # marks the HTML files this tool wrote (and may replace)
_MARKER = f'<meta name="generator" content="{GENERATOR}">'

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.text,th.text{text-align:left}
th,td.text{overflow-wrap:break-word}td.p,.nw{white-space:nowrap}
td.best{font-weight:bold;background:#e8f4e8}
.note{color:#8a4b00}.muted{color:#666;font-size:.9em}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
figure{margin:1em 0}figcaption{font-size:.9em;color:#444}
code{background:#f3f3f3;padding:0 .2em}
details{margin:.5em 0}
.swatch{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 .8em;vertical-align:middle;
border:1px solid #888}
"""


def esc(text):
    return html.escape(str(text), quote=True)


def breakable(text):
    """Escaped ``text`` that may wrap after '_' and '/' (dataset names, run names and paths
    have no spaces), so a table column can be narrower than its longest name."""
    text = re.sub(r"([_/])", r"\1<wbr>", esc(text))
    # ... but never inside a number such as 1e-3 (browsers break after any hyphen)
    return re.sub(r"(\d+(?:\.\d+)?e-\d+)", r'<span class="nw">\1</span>', text)


def page(title, sections, subtitle=""):
    """A complete HTML document. sections: HTML fragments, in order."""
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{_MARKER}\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n")
    body = f"<h1>{esc(title)}</h1>\n"
    body += f'<p class="muted">{subtitle}</p>\n' if subtitle else ""
    return head + body + "\n".join(sections) + "\n</body>\n</html>\n"


def section(title, *parts, anchor=""):
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h2{ident}>{esc(title)}</h2>\n" + "\n".join(p for p in parts if p)


def paragraph(text, cls=""):
    klass = f' class="{cls}"' if cls else ""
    return f"<p{klass}>{esc(text)}</p>"


def notes_list(notes):
    if not notes:
        return ""
    return '<ul class="note">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"


def _cell_text(value, digits):
    if isinstance(value, (float, np.floating)):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def table(frame, bold=None, digits=2, links=None, text_columns=None, ident="",
          classes=None):
    """``frame`` (a DataFrame) as an HTML table; the index is not shown.

    bold: set of (row position, column name) cells shown bold (the best of a column).
    links: {column: [href or None per row]} turning those cells into links.
    text_columns: left-aligned columns (default: the non-numeric ones); their text may
    also wrap after '_' and '/', so long labels and paths never widen the page past the
    screen.
    ident: the table's id attribute. classes: {column: CSS class of its cells}.
    """
    bold = bold or set()
    links = links or {}
    classes = classes or {}
    if text_columns is None:
        text_columns = {c for c in frame.columns
                        if not pd.api.types.is_numeric_dtype(frame[c].dtype)}
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{breakable(c)}</th>'
                   for c in frame.columns)
    rows = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cells = []
        for column in frame.columns:
            text = _cell_text(row[column], digits)
            text = breakable(text) if column in text_columns else esc(text)
            href = links.get(column, [None] * len(frame))[i]
            if href:
                text = f'<a href="{esc(href)}">{text}</a>'
            names = " ".join(k for k, on in (("text", column in text_columns),
                                             ("best", (i, column) in bold),
                                             (classes.get(column, ""), column in classes))
                             if on)
            cells.append(f'<td class="{names}">{text}</td>' if names else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    opening = f'<table id="{esc(ident)}">' if ident else "<table>"
    return f"{opening}\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + \
        "\n</tbody>\n</table>"


def image(png, alt, caption="", zoom=1):
    """An <img> holding ``png`` (bytes) as a data: URI, in a <figure> when captioned.

    zoom > 1: shown that many times its size with square (not blurred) pixels.
    """
    data = base64.b64encode(png).decode("ascii")
    style = ""
    if zoom > 1:
        width = int.from_bytes(png[16:20], "big")  # the PNG header's IHDR width
        style = f' style="width:{zoom * width}px;image-rendering:pixelated"'
    tag = f'<img alt="{esc(alt)}"{style} src="data:image/png;base64,{data}">'
    if caption:
        return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>"
    return tag


def legend(entries):
    """Colour swatches: entries [(label, (r, g, b))] with components 0..255."""
    if not entries:
        return ""
    items = "".join(f'<span class="swatch" style="background:rgb{tuple(rgb)}"></span>'
                    f"{esc(label)} " for label, rgb in entries)
    return f'<p class="legend">{items}</p>'


def is_ours(path):
    """True when ``path`` is an HTML file this tool wrote (or does not exist)."""
    path = Path(path)
    if not path.exists():
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return _MARKER in handle.read(4096)
    except OSError:
        return False


def write_page(path, text):
    """Write an HTML page atomically; UserError if ``path`` is a file we did not write."""
    path = Path(path)
    if not is_ours(path):
        raise UserError(f"{path} exists and was not written by this tool; move it away "
                        "(reports never replace other files)")
    write_text(path, text)
    return path
