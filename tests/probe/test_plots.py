"""Pictures (unit histogram, data-efficiency curve, per-character colouring as HTML and PNG) and
steered generation."""

import numpy as np
import pytest
import torch

import fastmlstm
from fastmlstm.probe import (
    DataEfficiency,
    cell_trace,
    plot_data_efficiency,
    plot_unit_histogram,
    preprocess,
    steer,
    text_html,
    text_png,
    text_values,
    visualize_text,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _model():
    torch.manual_seed(0)
    return fastmlstm.ByteLM(hidden_size=24, embed_size=8)


def _is_png(path, min_width=50):
    data = path.read_bytes()
    assert data[:8] == PNG
    width = int.from_bytes(data[16:20], "big")
    assert width >= min_width
    return width


def test_unit_histogram_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    v = rng.normal(size=300) + 2 * y
    path = plot_unit_histogram(v, y, tmp_path / "sub" / "hist.png", unit=2388)
    assert path.exists()
    _is_png(path)
    with pytest.raises(ValueError, match="one length"):
        plot_unit_histogram(v, y[:10], tmp_path / "x.png")
    with pytest.raises(ValueError, match="class names"):
        plot_unit_histogram(v, y, tmp_path / "x.png", class_names=["only one"])


def test_data_efficiency_png(tmp_path):
    acc = np.array([[0.6, 0.7, 0.65], [0.8, 0.82, 0.79], [0.9, np.nan, np.nan]])
    curve = DataEfficiency(np.array([10, 100, 1000]), acc, np.full_like(acc, 0.25))
    np.testing.assert_allclose(curve.median, [0.65, 0.8, 0.9])
    _is_png(plot_data_efficiency(curve, tmp_path / "de.png", reference={"paper": 91.8}))


def test_text_values_follow_characters_not_bytes():
    data = preprocess("caf\u00e9 \u2603!")
    values = np.arange(len(data), dtype=np.float64)
    chars = text_values(data, values)
    assert "".join(c for c, _ in chars) == "caf\u00e9 \u2603!"
    by_char = dict(chars)
    # each character takes the value after its last byte: "\n " is bytes 0-1, "c" byte 2,
    # "é" bytes 5-6, "☃" bytes 8-10
    assert by_char["c"] == 2 and by_char["\u00e9"] == 6 and by_char["\u2603"] == 10 and by_char["!"] == 11
    raw = text_values(b"a\xffb", np.array([1.0, 2.0, 3.0]))
    assert raw == [("a", 1.0), ("\ufffd", 2.0), ("b", 3.0)]
    with pytest.raises(ValueError, match="values for"):
        text_values(b"abc", np.zeros(2))


def test_html_is_self_contained_and_escaped(tmp_path):
    chars = [("<", 0.5), ("b", -0.5), (">", 0.0), ("&", 1.0), ("\x1a", -1.0), ("\u00e9", 0.2)]
    page = text_html(chars, tmp_path / "t.html", unit=7)
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and 'charset="utf-8"' in page
    assert "&lt;" in page and "&amp;" in page and "<b>" not in page
    assert "\u241a" in page  # the control byte is shown as its Control Picture
    assert page.count("<span style=\"background:rgb(") == len(chars) + 2  # + the legend's two ends
    assert 'title="+1.0000"' in page and 'title="-1.0000"' in page
    assert "http" not in page and "<script" not in page and "<link" not in page  # nothing fetched


def test_visualize_text_writes_both_and_matches_the_trace(tmp_path):
    model = _model()
    text = "Great product, terrible box. Would buy again!"
    chars = visualize_text(model, text, unit=5, html_path=tmp_path / "v.html", png_path=tmp_path / "v.png", width=20)
    assert "".join(c for c, _ in chars) == text
    trace = cell_trace(model, text, units=[5])[:, 0]
    np.testing.assert_allclose([v for _, v in chars], trace[2:-1])  # without "\n " and the end space
    assert (tmp_path / "v.html").read_text(encoding="utf-8").count("<span") >= len(text)
    width = _is_png(tmp_path / "v.png")
    _is_png(text_png(chars, tmp_path / "wide.png", width=80))
    assert width < _is_png(tmp_path / "wide.png")  # wrapped at 20 characters, so narrower


def test_steer_holds_the_unit_with_the_sign(monkeypatch):
    model = _model()
    seen = []
    real = model.generate

    def spy(prefix, n_bytes, temperature, **kw):
        seen.append(kw["fixed_units"])
        return real(prefix, n_bytes, temperature, **kw)

    monkeypatch.setattr(model, "generate", spy)
    out = steer(model, 3, prefix="The", n_bytes=12, num_samples=2, unit_sign=-1, seed=5)
    assert seen == [{3: -1.0}, {3: 1.0}]
    assert set(out) == {"positive", "negative"} and all(len(v) == 2 for v in out.values())
    assert all(isinstance(s, str) for v in out.values() for s in v)
    assert steer(model, 3, prefix="The", n_bytes=12, num_samples=2, unit_sign=-1, seed=5) == out  # seeded


def test_steer_values_change_samples():
    model = _model()
    out = steer(model, 0, {"up": 8.0, "down": -8.0, "free": 0.0}, n_bytes=40, num_samples=2, seed=1)
    assert out["up"] != out["down"]
    with pytest.raises(ValueError, match="unit_sign"):
        steer(model, 0, unit_sign=2)
    with pytest.raises(ValueError, match="fixed_units"):
        steer(model, 24)
