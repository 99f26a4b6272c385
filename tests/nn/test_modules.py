"""FastMLSTM as a drop-in for torch.nn.LSTM: shapes, PackedSequence, effective weights, weight norm,
and clear errors for bad input."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from mlstm_f64 import mlstm_f64
from tolerances import rel_err
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence, pad_packed_sequence

import fastmlstm
from fastmlstm import BackendUnavailableError, FastMLSTM, multiplicative_lstm


@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_match_nn_lstm(batch_first):
    I, H = 5, 12
    ours = FastMLSTM(I, H, batch_first=batch_first).to(DEVICE)
    theirs = nn.LSTM(I, H, batch_first=batch_first).to(DEVICE)
    for x in (torch.randn(7, 3, I), torch.randn(1, 1, I), torch.randn(4, I)):  # batched, tiny, unbatched
        x = x.to(DEVICE)
        (o1, (h1, c1)), (o2, (h2, c2)) = ours(x), theirs(x)
        assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape
        (o1, (h1, c1)), (o2, (h2, c2)) = ours(x, (h1, c1)), theirs(x, (h2, c2))
        assert o1.shape == o2.shape and h1.shape == h2.shape


@pytest.mark.parametrize("bidirectional", [False, True])
def test_meta_tensors_give_nn_lstms_shapes(bidirectional):
    # Shape inference on the meta device (a model built there before its weights exist) runs like
    # nn.LSTM's: autocast, which has no meta device, is simply off there. The CPU backend, asked for
    # by name, says it needs CPU tensors.
    I, H = 5, 12
    kwargs = dict(num_layers=2, bidirectional=bidirectional, device="meta")
    ours, theirs = FastMLSTM(I, H, **kwargs), nn.LSTM(I, H, **kwargs)
    x = torch.randn(7, 3, I, device="meta", requires_grad=True)
    (o1, (h1, c1)), (o2, (h2, c2)) = ours(x, lengths=[7, 2, 5]), theirs(x)
    assert (o1.device, o1.shape, h1.shape, c1.shape) == (o2.device, o2.shape, h2.shape, c2.shape)
    grads = torch.autograd.grad(o1.sum(), [x, *ours.parameters()])
    assert all(g.device.type == "meta" and g.shape == p.shape for g, p in zip(grads, [x, *ours.parameters()]))
    out, (h, c) = ours.step(torch.randn(3, I, device="meta"))
    assert out.shape == (3, ours.num_directions * H) and h.shape == c.shape == (2 * ours.num_directions, 3, H)
    with pytest.raises(BackendUnavailableError, match="CPU tensors, not meta"):
        FastMLSTM(I, H, backend="cpu", device="meta")(x)


def test_packed_sequence_in_and_out_like_nn_lstm():
    I, H = 3, 10
    ours = FastMLSTM(I, H).to(DEVICE)
    theirs = nn.LSTM(I, H).to(DEVICE)
    seqs = [torch.randn(n, I, device=DEVICE) for n in (2, 5, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    hx = (torch.randn(1, 3, H, device=DEVICE), torch.randn(1, 3, H, device=DEVICE))
    o1, (h1, c1), cells = ours(packed, hx, return_cell_states=True)
    o2, (h2, _) = theirs(packed, hx)
    assert isinstance(o1, PackedSequence) and isinstance(cells, PackedSequence)
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(o1.sorted_indices, o2.sorted_indices)
    assert o1.data.shape == o2.data.shape and h1.shape == h2.shape
    # hx and h_n rows are in the original order, as with nn.LSTM: check against each row alone.
    padded, lengths = pad_packed_sequence(o1)
    padded_cells, _ = pad_packed_sequence(cells)
    for b, seq in enumerate(seqs):
        out, (h, c), cell = ours(seq.unsqueeze(1), (hx[0][:, b:b + 1], hx[1][:, b:b + 1]), return_cell_states=True)
        n = len(seq)
        torch.testing.assert_close(padded[:n, b], out[:, 0])
        torch.testing.assert_close(padded_cells[:n, b], cell[:, 0])
        torch.testing.assert_close(h1[0, b], h[0, 0])
        torch.testing.assert_close(c1[0, b], c[0, 0])


def test_batch_first_cell_states_follow_the_layout():
    rnn = FastMLSTM(3, 6, batch_first=True).to(DEVICE)
    out, (h, c), cells = rnn(torch.randn(2, 5, 3, device=DEVICE), return_cell_states=True)
    assert out.shape == cells.shape == (2, 5, 6)
    torch.testing.assert_close(cells[:, -1], c[0])
    torch.testing.assert_close(out[:, -1], h[0])


@pytest.mark.parametrize("weight_norm", [True, False])
def test_effective_weights_are_torch_layout_attributes(weight_norm):
    I, H = 4, 9
    rnn = FastMLSTM(I, H, weight_norm=weight_norm).to(DEVICE)
    shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "weight_im": (H, I), "weight_hm": (H, H)}
    for name, shape in shapes.items():
        w = getattr(rnn, name)
        assert w.shape == shape
        if weight_norm:
            with torch.no_grad():
                getattr(rnn, f"{name}_g").mul_(torch.linspace(0.5, 2.0, shape[0], device=DEVICE))
            torch.testing.assert_close(getattr(rnn, name).norm(dim=1), getattr(rnn, f"{name}_g").detach())
        else:
            assert isinstance(w, nn.Parameter)
    assert rnn.bias is True and rnn.bias_ih.shape == (4 * H,)
    # m = (x W_im^T) * (h W_hm^T), z = x W_ih^T + m W_hh^T + b, computed from the attributes alone:
    x = torch.randn(6, 2, I, device=DEVICE)
    out, (h, c) = rnn(x)
    w = {k: getattr(rnn, k).detach().double() for k in shapes}
    ref, h_ref, c_ref, _ = mlstm_f64(x.double(), w["weight_ih"], w["weight_hh"], w["weight_im"], w["weight_hm"],
                                     rnn.bias_ih.detach().double(), torch.zeros(2, H, dtype=torch.float64, device=DEVICE),
                                     torch.zeros(2, H, dtype=torch.float64, device=DEVICE))
    assert rel_err(out, ref) < 1e-5 and rel_err(c[0], c_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_weight_norm_and_bias_gradients_match_float64(backend):
    I, H, T, B = 3, 11, 4, 3
    rnn = FastMLSTM(I, H, bias=False, weight_norm=False, backend=backend).to(DEVICE)
    x = torch.randn(T, B, I, device=DEVICE, requires_grad=True)
    out, (h, c) = rnn(x)
    (out.sum() + (c ** 2).sum()).backward()
    params = {n: p.detach().double().requires_grad_() for n, p in rnn.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    zeros = torch.zeros(B, H, dtype=torch.float64, device=DEVICE)
    ref, _, c_ref, _ = mlstm_f64(x64, params["weight_ih"], params["weight_hh"], params["weight_im"],
                                 params["weight_hm"], None, zeros, zeros)
    (ref.sum() + (c_ref ** 2).sum()).backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    for n, p in rnn.named_parameters():
        assert rel_err(p.grad, params[n].grad) < 1e-5, n


def test_functional_equals_module():
    rnn = FastMLSTM(4, 8, batch_first=True).to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    out, (h, c) = rnn(x)
    out2, (h2, c2) = multiplicative_lstm(x, *rnn.effective_weights(), batch_first=True)
    assert torch.equal(out, out2) and torch.equal(h[0], h2) and torch.equal(c[0], c2)


def test_empty_sequence_returns_the_initial_state():
    rnn = FastMLSTM(3, 5).to(DEVICE)
    hx = (torch.randn(1, 2, 5, device=DEVICE), torch.randn(1, 2, 5, device=DEVICE))
    out, (h, c) = rnn(torch.randn(0, 2, 3, device=DEVICE), hx)
    assert out.shape == (0, 2, 5)
    assert torch.equal(h, hx[0]) and torch.equal(c, hx[1])


def test_state_dict_round_trip_and_dtype_move():
    a = FastMLSTM(3, 7)
    b = FastMLSTM(3, 7)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 3)
    assert torch.equal(a(x)[0], b(x)[0])
    assert set(a.state_dict()) == {f"{n}_{s}" for n in ("weight_ih", "weight_hh", "weight_im", "weight_hm")
                                   for s in "vg"} | {"bias_ih"}
    half = b.to(torch.bfloat16)
    out, (h, c) = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and h.dtype == c.dtype == torch.float32


def test_autocast_runs_in_the_autocast_dtype():
    rnn = FastMLSTM(3, 6).to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, (h, c) = rnn(x)
    assert out.dtype == torch.bfloat16 and c.dtype == torch.float32
    # Same numbers as running in bf16 explicitly: autocast must not downcast the float32 math inside.
    weights = [None if w is None else w.bfloat16() for w in rnn.effective_weights()]
    out2, (h2, c2) = multiplicative_lstm(x.bfloat16(), *weights)
    assert torch.equal(out, out2) and torch.equal(c[0], c2)
    out.float().sum().backward()
    assert rnn.weight_hm_v.grad.dtype == torch.float32


@pytest.mark.parametrize("bidirectional", [False, True])
def test_autocast_leaves_a_float64_module_in_float64_like_nn_lstm(bidirectional):
    # Autocast never casts float64 tensors; nn.LSTM's float64 outputs stay float64 under it. The
    # layer once cast a float64 input and weights down to the autocast dtype, silently.
    torch.manual_seed(0)
    rnn = FastMLSTM(3, 6, 2, bidirectional=bidirectional).double().to(DEVICE)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    expected, (h_e, c_e) = rnn(x)
    lstm = nn.LSTM(3, 6, 2, bidirectional=bidirectional).double().to(DEVICE)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(DEVICE.type, dtype=dtype):
            out, (h, c) = rnn(x)
            step, (h_s, _) = rnn.step(x[0])
            theirs = lstm(x)[0]
        assert out.dtype == h.dtype == c.dtype == step.dtype == h_s.dtype == theirs.dtype == torch.float64
        assert torch.equal(out, expected) and torch.equal(h, h_e) and torch.equal(c, c_e)
        assert torch.equal(step, rnn.step(x[0])[0])


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, w):
        return w * self.factor


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("name", ["weight_hm_g", "weight_ih_l1_v", "bias_ih"])
def test_pruned_and_parametrized_parameters_work_as_with_nn_lstm(how, name):
    # torch.nn.utils.prune and .parametrize replace a parameter by a computed attribute, as they do
    # on nn.LSTM's. The weight-normalized matrices once read _v and _g from the parameter dict only
    # (a KeyError), and the weight cache, keyed on the parameters, missed a new mask or factor.
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(0)
    rnn = FastMLSTM(3, 6, 2).to(DEVICE)
    plain = FastMLSTM(3, 6, 2).to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)

    def replace(amount):  # prune `amount` of the entries, or scale by it; -> the new value
        if how == "prune":
            prune.l1_unstructured(rnn, name, amount=amount)
        elif parametrize.is_parametrized(rnn, name):
            rnn.parametrizations[name][0].factor = amount
        else:
            parametrize.register_parametrization(rnn, name, _Scale(amount))
        return getattr(rnn, name).detach()

    with torch.no_grad():
        rnn(x)  # (cached weights, which a new mask or factor must replace)
    for amount in (0.3, 0.6):
        value = replace(amount)
        plain.load_state_dict({**{k.removesuffix("_orig"): v for k, v in rnn.state_dict().items()
                                  if "_mask" not in k and "parametrizations" not in k}, name: value})
        with torch.no_grad():
            expected = plain(x)[0]
            assert torch.equal(rnn(x)[0], expected) and torch.equal(rnn.step(x[0])[0], plain.step(x[0])[0])
    out = rnn(x)[0]
    assert torch.equal(out, expected)
    out.sum().backward()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem, raised before any kernel runs.

def _rnn():
    return FastMLSTM(4, 6).to(DEVICE)


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        (lambda r: r(torch.randn(2, 3, 4, 5)), ValueError, "3-D"),
        (lambda r: r(torch.randn(5)), ValueError, "3-D"),
        (lambda r: r(torch.randn(5, 2, 3)), ValueError, "input_size is 4"),
        (lambda r: r(torch.randn(5, 2, 4, dtype=torch.float64)), TypeError, "has dtype torch.float32 but the input"),
        (lambda r: r(torch.randint(0, 3, (5, 2, 4))), TypeError, "unsupported dtype"),
        (lambda r: r(torch.randn(5, 2, 4).half()), TypeError, "dtype"),  # input dtype != weights'
        (lambda r: r(torch.randn(5, 2, 4), torch.zeros(1, 2, 6)), TypeError, "pair"),
        (lambda r: r(torch.randn(5, 2, 4), (torch.zeros(2, 6), torch.zeros(2, 6))), ValueError,
         r"\[num_layers \* num_directions, B, H\] = \[1, 2, 6\], got \[2, 6\]"),
        (lambda r: r(torch.randn(5, 2, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6))), ValueError, "h_0 must have shape"),
        (lambda r: r(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 5))), ValueError, "c_0 must have shape"),
        (lambda r: r(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6, dtype=torch.float64),) * 2), TypeError, "float32"),
        (lambda r: r(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6, device="meta"),) * 2), ValueError, "meta"),
        (lambda r: r(torch.randn(5, 2, 4), lengths=[5, 6]), ValueError, r"\[0, T\]"),
        (lambda r: r(torch.randn(5, 2, 4), lengths=[5]), ValueError, r"shape \[B\]"),
        (lambda r: r(torch.randn(5, 2, 4), lengths=torch.tensor([1.0, 2.0])), TypeError, "integers"),
        (lambda r: r(torch.randn(5, 2, 4), lengths=[2.9, 5]), TypeError, r"integers, got 2.9 \(float\)"),  # not 2
        (lambda r: r(torch.randn(5, 2, 4), lengths=[True, 5]), TypeError, "integers, got True"),
        (lambda r: r(torch.randn(5, 2, 4), lengths=["a", "b"]), TypeError, "integers, got 'a'"),
        (lambda r: r(torch.randn(5, 2, 4), weights=FastMLSTM(4, 8).effective_weights()), ValueError,
         r"weight_ih must be \[24, 4\] for this module \(4, 6\), got \[32, 4\]"),
        (lambda r: r.step(torch.randn(2, 4), weights=FastMLSTM(4, 6, bias=False).effective_weights()), ValueError,
         "bias must be"),
        (lambda r: fastmlstm.weight_norm(torch.ones(3, 4, dtype=torch.long), torch.ones(3, dtype=torch.long)),
         TypeError, "floating-point"),  # (not all zeros)
        (lambda r: fastmlstm.weight_norm(torch.randn(3, 4), torch.ones(5)), ValueError, r"gain \[rows\]"),
        (lambda r: r.step(torch.randn(2, 3, 4)), ValueError, "step input"),
    ],
)
def test_bad_input_raises_a_clear_error(make_call, error, match):
    rnn = FastMLSTM(4, 6)  # on CPU: device mismatches use the meta device
    with pytest.raises(error, match=match):
        make_call(rnn)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size"):
        FastMLSTM(4, 0)
    with pytest.raises(ValueError, match="backend"):
        FastMLSTM(4, 6, backend="fast")
    with pytest.raises(TypeError, match="unsupported dtype"):
        FastMLSTM(4, 6, dtype=torch.complex64)


def test_functional_rejects_mixed_devices_and_shapes():
    H, I = 6, 4
    w = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(H, I), torch.randn(H, H)]
    x = torch.randn(3, 2, I)
    with pytest.raises(ValueError, match="weight_hh is on meta"):
        multiplicative_lstm(x, w[0], w[1].to("meta"), w[2], w[3])
    with pytest.raises(ValueError, match=r"weight_im must have shape \[6, 4\]"):
        multiplicative_lstm(x, w[0], w[1], w[2].t(), w[3])
    with pytest.raises(ValueError, match="bias must have shape"):
        multiplicative_lstm(x, *w, torch.zeros(H))


def _old_bias_names(state: dict, prefix: str = "") -> dict:
    """``state`` with the bias keys as fastmlstm wrote them before ``bias`` became nn.LSTM's bool."""
    return {prefix + k.replace("bias_ih", "bias"): v for k, v in state.items()}


@pytest.mark.parametrize("layers, bidirectional, weight_norm", [(1, False, True), (2, True, True), (2, False, False)])
def test_state_dicts_with_the_old_bias_names_still_load(layers, bidirectional, weight_norm):
    g = torch.Generator().manual_seed(3)
    like = FastMLSTM(3, 5, layers, bidirectional=bidirectional, weight_norm=weight_norm)
    raw = {k: torch.randn(v.shape, generator=g) for k, v in like.state_dict().items()}  # tensors of no module
    old = _old_bias_names(raw)
    assert "bias" in old and not any(k.startswith("bias_ih") for k in old)
    if layers > 1:
        assert "bias_l1" in old and (not bidirectional or "bias_l0_reverse" in old)
    rnn = FastMLSTM(3, 5, layers, bidirectional=bidirectional, weight_norm=weight_norm)
    assert not rnn.load_state_dict(old).missing_keys
    loaded = rnn.state_dict()
    assert loaded.keys() == raw.keys()
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)  # byte-identical, under the new names
    assert torch.equal(rnn.bias_ih, raw["bias_ih"])


def test_old_bias_names_load_into_a_byte_lm_and_from_a_model_file(tmp_path):
    from fastmlstm import ByteLM, load

    g = torch.Generator().manual_seed(4)
    model = ByteLM(hidden_size=8, embed_size=4)
    raw = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    old = {k.replace("rnn.bias_ih", "rnn.bias"): v for k, v in raw.items()}
    assert "rnn.bias" in old and "rnn.bias_ih" not in old
    fresh = ByteLM(hidden_size=8, embed_size=4)
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], raw[k]) for k in raw)
    # A model file of the earlier layout, written as fastmlstm wrote them (format, version, config, state_dict).
    record = model.to_record()
    record["state_dict"] = old
    torch.save(record, tmp_path / "old.pt")
    loaded = load(tmp_path / "old.pt")
    assert all(torch.equal(loaded.state_dict()[k], raw[k]) for k in raw)


def test_a_bias_false_module_does_not_take_a_bias():
    rnn = FastMLSTM(3, 5, bias=False)
    state = {**rnn.state_dict(), "bias": torch.zeros(20)}
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
        rnn.load_state_dict(state)


NN_LSTM_ATTRIBUTES = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                      "proj_size")


@pytest.mark.parametrize("args, kwargs", [
    ((3, 5), {}),
    ((3, 5, 2), {"bias": False, "batch_first": True, "dropout": 0.25, "bidirectional": True}),
    ((4, 6, 3, True, False, 0, True), {}),
    ((2, 3), {"dropout": 1, "num_layers": 2}),
])
def test_public_attributes_equal_nn_lstms(args, kwargs):
    ours, theirs = FastMLSTM(*args, **kwargs), nn.LSTM(*args, **kwargs)
    for name in NN_LSTM_ATTRIBUTES:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a == b and type(a) is type(b), (name, a, b)
    assert ours.extra_repr() == theirs.extra_repr()
    # nn.LSTM's per-layer names read the tensors of the same shapes (weight_hh is applied to m here).
    for layer in range(ours.num_layers):
        for suffix in (f"_l{layer}", f"_l{layer}_reverse")[: 1 + ours.bidirectional]:
            for name in ("weight_ih", "weight_hh") + (("bias_ih",) if ours.bias else ()):
                assert getattr(ours, name + suffix).shape == getattr(theirs, name + suffix).shape, name + suffix
    assert len(ours.all_weights) == len(theirs.all_weights)
    assert all(isinstance(p, nn.Parameter) for group in ours.all_weights for p in group)
    assert [p for group in ours.all_weights for p in group] == list(ours.parameters())
    assert ours.bias_enabled is ours.bias
    if ours.bias:
        assert ours.bias_ih_l0 is ours.bias_ih
    else:
        assert ours.bias_ih is None


@pytest.mark.parametrize("kwargs, error", [
    ({"dropout": float("nan")}, "dropout must be a finite number in [0, 1], got nan"),
    ({"dropout": float("inf")}, "dropout must be a finite number in [0, 1], got inf"),
    ({"dropout": -0.1}, "dropout must be a finite number in [0, 1], got -0.1"),
    ({"dropout": True}, "dropout must be a finite number in [0, 1], got True"),
    ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
    ({"hidden_size": 4.0}, "hidden_size must be an integer >= 1, got 4.0"),
    ({"input_size": -2}, "input_size must be an integer >= 1, got -2"),
    ({"num_layers": True}, "num_layers must be an integer >= 1, got True"),
])
def test_numeric_arguments_are_checked(kwargs, error):
    import fastmlstm

    args = {"input_size": 3, "hidden_size": 5, "num_layers": 2, **kwargs}
    with pytest.raises(fastmlstm.InputError) as info:
        FastMLSTM(**args)
    assert str(info.value) == error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_norm_fused_and_eager_agree_and_a_zero_row_gives_zeros(dtype, monkeypatch):
    """weight_norm runs PyTorch's fused kernel on CPU tensors: it agrees with the eager formula
    (values and both gradients, within one rounding of the dtype), and an all-zero row gives zero
    weights and zero gradients, not NaN or a huge gradient."""
    from fastmlstm.nn import modules

    torch.manual_seed(0)
    v = torch.randn(24, 40).to(dtype)
    v[5] = 0
    g = torch.rand(24).add(0.5).to(dtype)
    grad = torch.randn(24, 40).to(dtype)

    def run(fused: bool, rows: slice):
        monkeypatch.setattr(modules, "_fused_weight_norm_applies", lambda *a: fused)
        vv, gg = v[rows].clone().requires_grad_(), g[rows].clone().requires_grad_()
        w = modules.weight_norm(vv, gg)
        return (w, *torch.autograd.grad(w, (vv, gg), grad[rows]))

    eps = torch.finfo(dtype).eps
    for rows in (slice(6, 24), slice(0, 24)):  # without, then with the zero row (the fused call falls back)
        fused, eager = run(True, rows), run(False, rows)
        for a, b in zip(fused, eager):
            assert a.dtype == b.dtype == dtype and torch.isfinite(a.float()).all()
            assert rel_err(a.float(), b.float()) <= 4 * eps
    w, grad_v, grad_g = run(True, slice(0, 24))
    assert not w[5].any() and not grad_v[5].any() and grad_g[5] == 0
    monkeypatch.undo()
    square = torch.randn(16, 16).to(dtype)  # a transposed view: the fused kernel is not given it
    transposed, copied = (modules.weight_norm(w, g[:16]).float() for w in (square.t(), square.t().contiguous()))
    assert rel_err(transposed, copied) <= 4 * eps
