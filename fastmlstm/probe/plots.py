"""Pictures: the sentiment unit's histogram by class (paper Fig. 3), the data-efficiency curve
(Fig. 2), and a text coloured character by character by a unit's value (Fig. 4), as a
self-contained HTML page and a PNG.

A figure is written in the format its file name's suffix names, as matplotlib writes it (``.png``,
``.pdf``, ``.svg``, ``.jpg``, ...; PNG for a name without a suffix); a suffix matplotlib has no
writer for (``.html``, ``.xyz``) raises :class:`~fastmlstm.errors.InputError` before anything is drawn.

matplotlib (the ``plots`` extra) is imported inside the functions with the non-interactive Agg
backend, so importing this module opens no window, needs no display, and works without matplotlib
(the HTML page needs none; a PNG without it raises MissingDependencyError saying what to install).
"""

from __future__ import annotations

import codecs
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._atomic import atomic_write
from ..errors import InputError, InputTypeError, require
from ..options import Number, check
from .features import END, START, cell_trace, encode_texts
from .linear import DataEfficiency

__all__ = ["plot_data_efficiency", "plot_unit_histogram", "text_html", "text_png", "text_values", "visualize_text"]


def _pyplot():
    matplotlib = require("matplotlib", extra="plots", feature="drawing PNG figures")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _format(path) -> str:
    """The image format ``path``'s suffix names (``png`` without a suffix); :class:`InputError` for
    one that matplotlib cannot write."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        hint = " (the coloured-text page is text_html's)" if suffix in ("html", "htm") else ""
        raise InputError(f"{path}: matplotlib cannot write .{suffix} figures{hint}; name the file with one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return suffix


def _save(fig, path, fmt: str) -> Path:
    """Write ``fig`` in format ``fmt`` atomically: ``path`` holds the old picture or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def plot_unit_histogram(values, labels, path, *, unit: int | None = None, class_names: Sequence[str] | None = None,
                        title: str | None = None, bins: int = 50) -> Path:
    """Histogram of one unit's feature values, one colour per class (paper Fig. 3); writes an image.

    Args:
        values: [N] the unit's feature values (e.g. ``features[:, unit]``), finite numbers.
        labels: [N] class labels.
        path: where the image goes, in the format its suffix names (PNG without one).
        unit: the unit's index, for the title.
        class_names: names of the sorted classes (default "negative", "positive" for two classes).
    """
    fmt = _format(path)
    try:
        values = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputTypeError(f"values must be numbers [N], got {type(values).__name__}") from None
    labels = np.asarray(labels).ravel()
    if values.shape != labels.shape or values.size == 0:
        raise InputError(f"values and labels must be two non-empty [N] arrays of one length, "
                         f"got {values.shape} and {labels.shape}")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(f"values must be finite numbers, got {values[bad]} at index {bad} "
                         f"({int(np.sum(~np.isfinite(values)))} of {values.size} are NaN or infinite)")
    classes = np.unique(labels)
    if class_names is None:
        class_names = ("negative", "positive") if len(classes) == 2 else [str(c) for c in classes]
    if len(class_names) != len(classes):
        raise InputError(f"{len(class_names)} class names for {len(classes)} classes")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.histogram_bin_edges(values, bins=_BINS.check(bins, "bins"))
    for c, name, colour in zip(classes, class_names, ("tab:red", "tab:blue", "tab:green", "tab:orange")):
        ax.hist(values[labels == c], bins=edges, alpha=0.55, color=colour, label=f"{name} ({np.sum(labels == c)})")
    ax.set_xlabel("feature value" if unit is None else f"unit {unit} value")
    ax.set_ylabel("count")
    ax.set_title(title or ("sentiment unit by class" if unit is None else f"unit {unit} by class"))
    ax.legend()
    return _save(fig, path, fmt)


def plot_data_efficiency(curve: DataEfficiency, path, *, title: str | None = None,
                         reference: dict[str, float] | None = None) -> Path:
    """Accuracy against labelled examples, median with the 10th-90th percentile band (paper Fig. 2).

    ``reference``: optional ``{label: accuracy in percent}`` drawn as horizontal lines. ``path``: the
    image, in the format its suffix names (PNG without one).
    """
    if not isinstance(curve, DataEfficiency):
        raise InputTypeError(f"curve must be a DataEfficiency (from data_efficiency), got {type(curve).__name__}")
    fmt = _format(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = curve.sizes
    ax.fill_between(sizes, 100 * curve.p10, 100 * curve.p90, alpha=0.25, color="tab:blue", label="10th-90th percentile")
    ax.plot(sizes, 100 * curve.median, "o-", color="tab:blue", label="median")
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (sizes[0], value), fontsize=8, va="bottom", color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "data efficiency of the L1 linear probe")
    ax.legend(loc="lower right")
    return _save(fig, path, fmt)


def text_values(data: bytes, values: np.ndarray, *, skip_padding: bool = True) -> list[tuple[str, float]]:
    """Pair each character of the UTF-8 bytes ``data`` with ``values[j]``, the value after the
    character's last byte j. Invalid bytes become U+FFFD. With ``skip_padding`` the paper's start
    token (``"\\n "``) and end space are left out when ``data`` has them."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) != len(data):
        raise InputError(f"{len(values)} values for {len(data)} bytes")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for j in range(len(data)):
        for ch in decoder.decode(data[j : j + 1]):
            out.append((ch, float(values[j])))
    for ch in decoder.decode(b"", final=True):  # a truncated sequence at the end
        out.append((ch, float(values[-1])))
    if skip_padding and data.startswith(START.encode()) and data.endswith(END.encode()):
        out = out[len(START) : len(out) - len(END)]
    return out


_BINS = Number(int, 1)  # histogram bins


def _scale(chars: Sequence[tuple[str, float]], scale: float | None) -> float:
    """The value shown at full colour: ``scale`` (a number > 0), else the largest |value| of the
    pairs (1 where there is none); the pairs' values must be finite numbers."""
    scale = check("scale", scale)
    try:
        vals = np.array([v for _, v in chars], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputTypeError("chars must be (character, value) pairs with numeric values (text_values' result)") \
            from None
    if not np.all(np.isfinite(vals)):
        bad = int(np.flatnonzero(~np.isfinite(vals))[0])
        raise InputError(f"chars hold a value that is not a finite number: {vals[bad]} at pair {bad}")
    if scale is None:
        scale = float(np.max(np.abs(vals))) if len(vals) else 0.0
    return scale or 1.0


def _colour(value: float, scale: float) -> tuple[float, float, float]:
    """Diverging red (negative) - white - green (positive), value clipped to [-scale, scale]."""
    t = float(np.clip(value / scale, -1.0, 1.0)) if scale > 0 else 0.0
    if t >= 0:
        return (1 - 0.75 * t, 1 - 0.25 * t, 1 - 0.75 * t)
    t = -t
    return (1 - 0.15 * t, 1 - 0.75 * t, 1 - 0.75 * t)


def _visible(ch: str) -> str:
    code = ord(ch)
    if code < 32 and ch not in "\n\t":
        return chr(0x2400 + code)  # the Control Pictures block: U+241A for 0x1A, etc.
    if code == 127:
        return "\u2421"
    return ch


def text_html(chars: Sequence[tuple[str, float]], path=None, *, unit: int | None = None, scale: float | None = None,
              title: str | None = None) -> str:
    """A self-contained HTML page colouring each character by its value (paper Fig. 4).

    ``chars``: (character, value) pairs (:func:`text_values`). ``scale``: the value shown at full
    colour (default the largest absolute value). Hovering a character shows its value. Returns the
    page and writes it to ``path`` if given.
    """
    scale = _scale(chars, scale)
    heading = title or (f"cell value of unit {unit}" if unit is not None else "cell value")
    spans = []
    for ch, v in chars:
        r, g, b = (round(255 * x) for x in _colour(v, scale))
        text = "<br>" if ch == "\n" else html.escape(_visible(ch))
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{v:+.4f}">{text}</span>')
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(heading) + "</title>\n"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".text{font-family:monospace;font-size:15px;line-height:1.7;white-space:pre-wrap;word-wrap:break-word}"
        ".legend span{padding:0 .6em;font-family:monospace}</style></head>\n<body>\n"
        f"<h3>{html.escape(heading)}</h3>\n"
        f'<p class="legend">scale: <span style="background:rgb(217,64,64)">{-scale:+.3f}</span>'
        f'<span style="background:#fff">0</span><span style="background:rgb(64,191,64)">{scale:+.3f}</span></p>\n'
        '<div class="text">' + "".join(spans) + "</div>\n</body></html>\n"
    )
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(page.encode("utf-8"))
    return page


def text_png(chars: Sequence[tuple[str, float]], path, *, unit: int | None = None, scale: float | None = None,
             width: int = 80, title: str | None = None) -> Path:
    """The same colouring as :func:`text_html` drawn as an image (in the format ``path``'s suffix
    names, PNG without one), ``width`` characters per line."""
    fmt = _format(path)
    scale = _scale(chars, scale)
    width = check("width", width)
    lines: list[list[tuple[str, float]]] = [[]]
    for ch, v in chars:  # wrap at spaces where possible
        if ch == "\n":
            lines.append([])
            continue
        lines[-1].append((ch, v))
        if len(lines[-1]) >= width:
            row = lines[-1]
            cut = max((i for i, (c, _) in enumerate(row) if c == " "), default=-1)
            if 0 < cut < len(row) - 1:
                lines[-1], rest = row[: cut + 1], row[cut + 1 :]
                lines.append(rest)
            else:
                lines.append([])
    plt = _pyplot()
    cw, lh = 0.105, 0.24  # character width and line height in inches at fontsize 10
    n_cols = max([len(line) for line in lines] + [1])
    fig = plt.figure(figsize=(max(2.0, n_cols * cw + 0.4), len(lines) * lh + 0.7))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, n_cols)
    ax.set_ylim(len(lines) + 1.4, 0)
    ax.axis("off")
    heading = f"cell value of unit {unit}" if unit is not None else "cell value"
    ax.text(0, 0.6, title or f"{heading} (scale ±{scale:.3f})", fontsize=9, va="center")
    for row, line in enumerate(lines, start=1):
        for col, (ch, v) in enumerate(line):
            ax.add_patch(plt.Rectangle((col, row), 1, 1, color=_colour(v, scale), linewidth=0))
            ax.text(col + 0.5, row + 0.55, _visible(ch), fontsize=10, family="monospace", ha="center", va="center")
    return _save(fig, path, fmt)


def visualize_text(model, text: str | bytes, unit: int, *, html_path=None, png_path=None,
                   scale: float | None = None, width: int = 80) -> list[tuple[str, float]]:
    """Run ``text`` through the model and colour it by ``unit``'s cell value (paper Fig. 4).

    Writes the HTML page to ``html_path`` and/or the picture to ``png_path`` (PNG, or the format its
    suffix names); returns the (character, value) pairs.

    Example::

        >>> visualize_text(model, "Great product, awful box.", unit=2388,
        ...                html_path="fig4.html", png_path="fig4.png")   # doctest: +SKIP
    """
    scale, width = check("scale", scale), check("width", width)
    if png_path is not None:
        _format(png_path)  # before the model runs or the page is written
    data = encode_texts([text])[0]
    values = cell_trace(model, text, units=[unit])[:, 0]
    chars = text_values(data, values)
    if html_path is not None:
        text_html(chars, html_path, unit=unit, scale=scale)
    if png_path is not None:
        text_png(chars, png_path, unit=unit, scale=scale, width=width)
    return chars
