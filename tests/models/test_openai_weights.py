"""The released 15-.npy layout: loading reproduces an independent NumPy implementation of the
released equations (features, per-byte cells, next-byte logits); exporting writes the layout back."""

import html
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

import fastmlstm
from fastmlstm.probe import cell_trace, featurize

H, E = 24, 8


def write_released(path, seed=0, H=H, E=E):
    """Random weights in the released layout, with gains far from the directions' norms so that
    weight normalization matters."""
    rng = np.random.default_rng(seed)
    f = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
    arrays = [f(256, E), f(E, 4 * H), f(H, H), f(H, H), f(H, H), f(H, H), f(E, H), f(H, H), f(4 * H, scale=0.5),
              rng.uniform(0.5, 2.0, 4 * H).astype(np.float32), rng.uniform(0.5, 2.0, 4 * H).astype(np.float32),
              rng.uniform(0.5, 2.0, H).astype(np.float32), rng.uniform(0.5, 2.0, H).astype(np.float32),
              f(H, 256, scale=0.3), f(256, scale=0.1)]
    path.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.save(path / f"{i}.npy", a)
    return arrays


def released_numpy(arrays, data: bytes):
    """The released encoder's equations in float64 NumPy, one byte at a time: per-step cells [T, H],
    logits [T, 256], final c. Weight norm as TensorFlow's l2_normalize(w, dim=0) * g."""
    p = [a.astype(np.float64) for a in arrays]
    wh = np.concatenate(p[2:6], axis=1)

    def l2n(w):
        return w / np.sqrt(np.maximum((w ** 2).sum(axis=0, keepdims=True), 1e-12))

    wx, wh, wmx, wmh = l2n(p[1]) * p[9], l2n(wh) * p[10], l2n(p[6]) * p[11], l2n(p[7]) * p[12]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    nh = p[7].shape[0]
    h = np.zeros(nh)
    c = np.zeros(nh)
    cells, logits = [], []
    for byte in data:
        x = p[0][byte]
        m = (x @ wmx) * (h @ wmh)
        z = x @ wx + m @ wh + p[8]
        i, f, o, u = np.split(z, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
        h = sigmoid(o) * np.tanh(c)
        cells.append(c)
        logits.append(h @ p[13] + p[14])
    return np.array(cells), np.array(logits), c


def paper_bytes(text: str) -> bytes:
    """The released utils.preprocess, written out again here."""
    return ("\n " + html.unescape(text).replace("\n", " ").strip() + " ").encode()


TEXTS = ["This is a great product, I love it!", "Terrible.\nWould not buy &amp; never again", "",
         "caf\u00e9 \u2014 ok", "x" * 70]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("released")
    return path, write_released(path)


def test_load_reproduces_released_features_cells_and_logits(released):
    path, arrays = released
    model = fastmlstm.load_openai(path)
    assert model.config == {"hidden_size": H, "embed_size": E, "weight_norm": True}
    feats = featurize(model, TEXTS, batch_size=2, chunk_size=16)
    for i, text in enumerate(TEXTS):
        data = paper_bytes(text)
        cells, logits, c = released_numpy(arrays, data)
        np.testing.assert_allclose(feats[i], np.tanh(c), rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(cell_trace(model, text), cells, rtol=1e-4, atol=2e-5)
        with torch.no_grad():
            out, _ = model(torch.tensor([list(data)], dtype=torch.uint8))
        np.testing.assert_allclose(out[0].numpy(), logits, rtol=1e-4, atol=2e-5)
    # raw features are the released encoder's transform() output (c without tanh)
    raw = featurize(model, TEXTS[:1], activation=None)
    np.testing.assert_allclose(raw[0], released_numpy(arrays, paper_bytes(TEXTS[0]))[2], rtol=1e-4, atol=2e-5)


def test_weight_norm_really_applies(released):
    path, arrays = released
    model = fastmlstm.load_openai(path)
    w = model.rnn.weight_hm.detach().numpy()  # [out, in]
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), arrays[12], rtol=1e-5)


def test_export_round_trip_is_exact(released, tmp_path):
    path, arrays = released
    model = fastmlstm.load_openai(path)
    fastmlstm.save_openai(model, tmp_path / "out")
    for i, a in enumerate(arrays):
        b = np.load(tmp_path / "out" / f"{i}.npy")
        assert b.dtype == np.float32 and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{i}.npy" for i in range(15))


@pytest.mark.parametrize("weight_norm", [True, False])
def test_export_of_a_fastmlstm_model_matches_the_released_equations(tmp_path, weight_norm):
    torch.manual_seed(3)
    model = fastmlstm.ByteLM(hidden_size=20, embed_size=6, weight_norm=weight_norm)
    fastmlstm.save_openai(model, tmp_path)
    arrays = [np.load(tmp_path / f"{i}.npy") for i in range(15)]
    text = "Exported & checked"
    cells, logits, _ = released_numpy(arrays, paper_bytes(text))
    np.testing.assert_allclose(cell_trace(model, text), cells, rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        out, _ = model(torch.tensor([list(paper_bytes(text))], dtype=torch.uint8))
    np.testing.assert_allclose(out[0].numpy(), logits, rtol=1e-4, atol=2e-5)


def test_load_options(released):
    path, _ = released
    model = fastmlstm.load_openai(path, dtype=torch.bfloat16, backend="reference")
    assert model.readout.weight.dtype == torch.bfloat16 and model.backend == "reference"
    assert featurize(model, ["ok"]).dtype == np.float32


def test_load_errors(tmp_path, released):
    path, _ = released
    with pytest.raises(FileNotFoundError, match="no released-weights directory"):
        fastmlstm.load_openai(tmp_path / "nowhere")
    (tmp_path / "file.npy").write_bytes(b"")
    with pytest.raises(fastmlstm.ModelFileError, match="fastmlstm.load"):
        fastmlstm.load_openai(tmp_path / "file.npy")
    partial = tmp_path / "partial"
    write_released(partial)
    (partial / "13.npy").unlink()
    with pytest.raises(FileNotFoundError, match="13.npy"):
        fastmlstm.load_openai(partial)
    bad = tmp_path / "bad"
    write_released(bad)
    np.save(bad / "6.npy", np.zeros((E, H + 1), np.float32))
    with pytest.raises(ValueError, match=r"6.npy \(wmx\) must have shape \[8, 24\]"):
        fastmlstm.load_openai(bad)
    assert fastmlstm.models.openai_weights.is_openai_dir(path) and not fastmlstm.models.openai_weights.is_openai_dir(partial)


RELEASE = DATA_DIR / "openai-release"
REAL_FILES = (0, 6, 8, 9, 10, 11, 12, 14)  # the 8 small released files kept in $FASTMLSTM_DATA/openai-release


@pytest.mark.skipif(not all((RELEASE / f"{i}.npy").is_file() for i in REAL_FILES),
                    reason="the 8 released files are not in $FASTMLSTM_DATA/openai-release")
def test_the_real_released_files_load_with_their_real_shapes(tmp_path):
    """The 8 published small files, with zero-filled stand-ins of the real shapes for the 7 large
    ones (sparse files: a .npy header, then a hole), load as the paper's H = 4096, E = 64 model."""
    H, E = 4096, 64
    large = {1: (E, 4 * H), 2: (H, H), 3: (H, H), 4: (H, H), 5: (H, H), 7: (H, H), 13: (H, 256)}
    for i in REAL_FILES:
        shutil.copy(RELEASE / f"{i}.npy", tmp_path / f"{i}.npy")
    for i, shape in large.items():
        with open(tmp_path / f"{i}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + 4 * shape[0] * shape[1])
    real = {i: np.load(RELEASE / f"{i}.npy") for i in REAL_FILES}
    expected_shapes = {0: (256, E), 6: (E, H), 8: (4 * H,), 9: (4 * H,), 10: (4 * H,), 11: (H,), 12: (H,), 14: (256,)}
    assert {i: a.shape for i, a in real.items()} == expected_shapes
    assert all(a.dtype == np.float32 for a in real.values())

    model = fastmlstm.load_openai(tmp_path)
    assert model.config == {"hidden_size": H, "embed_size": E, "weight_norm": True}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    rnn = model.rnn
    assert rnn.weight_ih_v.shape == (4 * H, E) and rnn.weight_hh_v.shape == (4 * H, H)
    assert rnn.weight_im_v.shape == (H, E) and rnn.weight_hm_v.shape == (H, H)
    assert model.readout.weight.shape == (256, H)
    # each real array lands where the released equations use it
    for tensor, i in [(model.embedding.weight, 0), (rnn.bias_ih, 8), (rnn.weight_ih_g, 9), (rnn.weight_hh_g, 10),
                      (rnn.weight_im_g, 11), (rnn.weight_hm_g, 12), (model.readout.bias, 14)]:
        assert np.array_equal(tensor.detach().numpy(), real[i]), i
    assert np.array_equal(rnn.weight_im_v.detach().numpy(), real[6].T)
    assert fastmlstm.models.openai_weights.SENTIMENT_UNIT < H
