"""FastMLSTM's effective-weight cache: reused while the parameters are unchanged, recomputed for
every way a parameter can change, never used where autograd must see the weight norm.

Each change is followed by a forward pass that must equal the same pass on weights computed afresh
(bit for bit: the same numbers through the same kernels)."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fastmlstm
from fastmlstm import FastMLSTM
from fastmlstm.nn import modules

I, H, T, B = 5, 24, 4, 3


def _fresh_output(rnn, x):
    with torch.no_grad():
        weights = rnn._compute_effective_weights()
        return fastmlstm.multiplicative_lstm(x, *weights, backend=rnn.backend)[0]


def _cached_output(rnn, x):
    with torch.no_grad():
        return rnn(x)[0]


@pytest.fixture
def rnn():
    torch.manual_seed(0)
    return FastMLSTM(I, H)


@pytest.fixture
def x():
    return torch.randn(T, B, I)


@pytest.fixture
def count_weight_norm(monkeypatch):
    calls = []
    real = modules.weight_norm

    def counting(v, g):
        calls.append(1)
        return real(v, g)

    monkeypatch.setattr(modules, "weight_norm", counting)
    return calls


def _assert_current(rnn, x, before=None):
    """The cached pass equals a pass on freshly computed weights (and, if given, differs from before)."""
    out = _cached_output(rnn, x)
    assert torch.equal(out, _fresh_output(rnn, x))
    if before is not None:
        assert not torch.equal(out, before)
    return out


def test_reused_while_parameters_are_unchanged(rnn, x, count_weight_norm):
    with torch.no_grad():
        first = rnn.effective_weights()
        second = rnn.effective_weights()
        rnn(x)
        state = None
        for t in range(3):  # a generation loop without weights=
            _, state = rnn.step(x[t], state)
    assert all(a is b for a, b in zip(first, second))
    assert len(count_weight_norm) == 4  # the four matrices, once
    assert all(w.grad_fn is None and not w.requires_grad for w in first[:4])  # no graph kept alive


def test_packed_weights_are_reused_too(rnn, x, monkeypatch):
    from fastmlstm.ops.cpu import recurrence

    if not fastmlstm.backend_status("cpu", "cpu")[0]:
        pytest.skip("the CPU extension is unavailable")
    rnn.backend = "cpu"
    _cached_output(rnn, x)
    packs = []

    class CountingOps:
        def __getattr__(self, name):
            op = getattr(torch.ops.fastmlstm_cpu, name)
            return (lambda *a: packs.append(1) or op(*a)) if name == "pack_weight" else op

    monkeypatch.setattr(recurrence, "_ops", CountingOps)
    _cached_output(rnn, x)
    with torch.no_grad():
        rnn.step(x[0])
    assert not packs
    with torch.no_grad():
        rnn.weight_hh_g.mul_(2)
    _cached_output(rnn, x)
    assert packs  # a changed weight is packed again


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_step(rnn, x, optimizer):
    before = _assert_current(rnn, x)
    opt = optimizer(rnn.parameters(), lr=0.1)
    rnn(x)[0].pow(2).sum().backward()
    opt.step()
    _assert_current(rnn, x, before)


def test_in_place_update_under_no_grad(rnn, x):
    before = _assert_current(rnn, x)
    with torch.no_grad():
        rnn.weight_hm_g.mul_(0.5)
    _assert_current(rnn, x, before)


def test_load_state_dict(rnn, x):
    before = _assert_current(rnn, x)
    other = FastMLSTM(I, H)
    rnn.load_state_dict(other.state_dict())
    _assert_current(rnn, x, before)


def test_load_state_dict_assign(rnn, x):
    before = _assert_current(rnn, x)
    other = FastMLSTM(I, H)
    rnn.load_state_dict(other.state_dict(), assign=True)
    _assert_current(rnn, x, before)


def test_data_assignment(rnn, x):
    before = _assert_current(rnn, x)
    rnn.weight_ih_v.data = torch.randn_like(rnn.weight_ih_v)
    _assert_current(rnn, x, before)


def test_data_assignment_of_a_transposed_view_of_the_same_storage():
    rnn = FastMLSTM(I, I)  # a square weight_hm: .t() keeps its shape and storage, changes its strides
    xs = torch.randn(T, B, I)
    before = _assert_current(rnn, xs)
    rnn.weight_hm_v.data = rnn.weight_hm_v.data.t()
    _assert_current(rnn, xs, before)


def test_replaced_parameter(rnn, x):
    before = _assert_current(rnn, x)
    rnn.weight_hh_g = nn.Parameter(torch.rand(4 * H) + 0.5)
    _assert_current(rnn, x, before)


def test_swap_tensors(rnn, x):
    before = _assert_current(rnn, x)
    torch.utils.swap_tensors(rnn.weight_hh_v, nn.Parameter(torch.randn(4 * H, H)))
    _assert_current(rnn, x, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype(rnn, x, dtype):
    _cached_output(rnn, x)
    rnn.to(dtype)
    out = _assert_current(rnn, x.to(dtype))
    assert out.dtype == dtype
    rnn.float()
    _assert_current(rnn, x)


def test_module_to_with_swap_tensors(rnn, x):
    _cached_output(rnn, x)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        rnn.to(torch.bfloat16)
        _assert_current(rnn, x.bfloat16())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_deepcopy_does_not_share_the_cache(rnn, x):
    _cached_output(rnn, x)
    twin = copy.deepcopy(rnn)
    with torch.no_grad():
        twin.weight_hm_g.mul_(2)
    assert torch.equal(_cached_output(rnn, x), _fresh_output(rnn, x))
    _assert_current(twin, x, _cached_output(rnn, x))


def test_a_caller_writing_into_the_cached_weights(rnn, x):
    before = _assert_current(rnn, x)
    with torch.no_grad():
        rnn.effective_weights().weight_hh.zero_()
    assert torch.equal(_cached_output(rnn, x), before)


def test_autocast_casts_are_cached_and_follow_changes(rnn, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = rnn(x)[0]
        assert first.dtype == torch.bfloat16
        assert torch.equal(rnn(x)[0], first)
        rnn.weight_hm_g.mul_(0.5)
        second = rnn(x)[0]
    assert not torch.equal(first, second)
    with torch.no_grad():
        expected = fastmlstm.multiplicative_lstm(
            x.bfloat16(), *modules.cast_weights(rnn._compute_effective_weights(), torch.bfloat16))[0]
    assert torch.equal(second, expected)


def test_training_recomputes_and_differentiates_the_weight_norm(rnn, x, count_weight_norm):
    for _ in range(2):
        out = rnn(x)[0]
        grads = torch.autograd.grad(out.pow(2).sum(), list(rnn.parameters()))
    assert len(count_weight_norm) == 8  # every forward under autograd
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert rnn.weight_hh_g.grad is None  # autograd.grad does not accumulate
    # the gradients of the gains and directions match a graph built by hand
    v, g = rnn.weight_hm_v, rnn.weight_hm_g
    w = g[:, None] * v / v.norm(dim=1, keepdim=True)
    ws = rnn._compute_effective_weights()
    ref = fastmlstm.multiplicative_lstm(x, ws.weight_ih, ws.weight_hh, ws.weight_im, w, ws.bias)[0]
    expected = torch.autograd.grad(ref.pow(2).sum(), [v, g])
    actual = torch.autograd.grad(rnn(x)[0].pow(2).sum(), [v, g])
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_use_the_cache_and_input_gradients_are_right(rnn, x, count_weight_norm):
    rnn.requires_grad_(False)
    xg = x.clone().requires_grad_()
    out = rnn(xg)[0]
    grad, = torch.autograd.grad(out.pow(2).sum(), xg)
    rnn(xg)
    assert len(count_weight_norm) == 4
    xr = x.clone().requires_grad_()
    ref = fastmlstm.multiplicative_lstm(xr, *rnn._compute_effective_weights(), backend=rnn.backend)[0]
    expected, = torch.autograd.grad(ref.pow(2).sum(), xr)
    torch.testing.assert_close(grad, expected)


def test_weights_cached_in_inference_mode_serve_later_autograd(rnn, x):
    rnn.requires_grad_(False)
    with torch.inference_mode():
        rnn(x)
    xg = x.clone().requires_grad_()
    out = rnn(xg)[0]  # would fail with "Inference tensors cannot be saved for backward"
    out.sum().backward()
    assert xg.grad is not None


def test_weight_norm_off_exposes_the_parameters_themselves():
    rnn = FastMLSTM(I, H, weight_norm=False)
    with torch.no_grad():
        assert rnn.effective_weights().weight_hh is rnn.weight_hh


def test_untracked_writes_are_seen_in_strict_mode(rnn, x, monkeypatch):
    """Writes that bypass the version counter (.data, NumPy views, vector_to_parameters buffers)
    are outside the default's tracking, as they are outside autograd's; strict mode sees them."""
    if not fastmlstm.backend_status("cpu", "cpu")[0]:
        pytest.skip("strict mode fingerprints with the CPU extension")
    monkeypatch.setenv(modules.ENV_WEIGHT_CACHE, "strict")
    before = _assert_current(rnn, x)
    rnn.weight_hm_g.data.mul_(0.5)  # version counter untouched
    before = _assert_current(rnn, x, before)
    rnn.weight_hh_v.detach().numpy()[3, 4] += 1.0
    before = _assert_current(rnn, x, before)
    flat = nn.utils.parameters_to_vector(rnn.parameters())
    nn.utils.vector_to_parameters(flat, rnn.parameters())
    before = _assert_current(rnn, x)
    with torch.no_grad():
        flat[:10] += 1.0  # the parameters are views of `flat` now, with their own version counters
    _assert_current(rnn, x, before)


def test_default_mode_tracks_version_counters_not_bytes(rnn, x, monkeypatch):
    """The documented boundary of the default: a write through .data is not seen (use strict)."""
    monkeypatch.setenv(modules.ENV_WEIGHT_CACHE, "on")
    before = _cached_output(rnn, x)
    rnn.weight_hm_g.data.mul_(0.5)
    assert torch.equal(_cached_output(rnn, x), before)
    with torch.no_grad():
        rnn.weight_hm_g.mul_(1.0)  # any tracked write refreshes
    _assert_current(rnn, x, before)


def test_off_mode_computes_every_call(rnn, x, monkeypatch, count_weight_norm):
    monkeypatch.setenv(modules.ENV_WEIGHT_CACHE, "off")
    with torch.no_grad():
        rnn(x)
        rnn(x)
    assert len(count_weight_norm) == 8
    monkeypatch.setenv(modules.ENV_WEIGHT_CACHE, "sometimes")
    with pytest.raises(ValueError, match=modules.ENV_WEIGHT_CACHE), torch.no_grad():
        rnn(x)


def test_byte_lm_generation_and_featurize_reuse_the_cache(count_weight_norm):
    torch.manual_seed(0)
    lm = fastmlstm.ByteLM(hidden_size=16, embed_size=8)
    lm.generate("ab", 5, seed=0)
    lm.generate("ab", 5, seed=0)
    from fastmlstm import probe

    probe.featurize(lm, ["hello", "world"], progress=False)
    assert len(count_weight_norm) == 4
    with torch.no_grad():
        lm.rnn.weight_ih_g.mul_(2)
    lm.generate("ab", 5, seed=0)
    assert len(count_weight_norm) == 8


def test_stacked_bidirectional_modules_cache_every_layer(x, count_weight_norm):
    torch.manual_seed(1)
    rnn = FastMLSTM(I, H, num_layers=2, bidirectional=True)
    with torch.no_grad():
        first = rnn(x)[0]
        assert torch.equal(rnn(x)[0], first)
        weights = rnn.effective_weights()
    assert len(count_weight_norm) == 4 * 4  # four matrices in each of four layer-directions, once
    assert isinstance(weights, tuple) and len(weights) == 4
    with torch.no_grad():
        rnn.weight_hm_l1_reverse_g.mul_(0.5)  # a change in the last layer-direction only
        second = rnn(x)[0]
        fresh = rnn(x, weights=rnn._compute_effective_weights())[0]
    assert not torch.equal(first, second) and torch.equal(second, fresh)


def test_a_training_step_through_data_is_seen(rnn, x):
    """PyTorch's word_language_model example: forward under autograd, then p.data.add_(grad)."""
    before = _assert_current(rnn, x)
    rnn(x)[0].pow(2).sum().backward()
    for p in rnn.parameters():
        p.data.add_(p.grad, alpha=-0.5)  # bypasses the version counter
    _assert_current(rnn, x, before)


@pytest.mark.parametrize("switch", ["train", "eval"])
def test_a_write_through_data_before_a_mode_switch_is_seen(rnn, x, switch):
    before = _assert_current(rnn, x)
    rnn.weight_hm_g.data.mul_(0.5)
    getattr(rnn, switch)()
    _assert_current(rnn, x, before)


def test_a_parent_modules_mode_switch_reaches_the_cache(x):
    torch.manual_seed(0)
    lm = fastmlstm.ByteLM(hidden_size=H, embed_size=I)
    seq = torch.randint(0, 256, (B, T), dtype=torch.uint8)
    with torch.no_grad():
        before = lm(seq)[0]
    lm.rnn.weight_hh_v.data.mul_(-1.0)
    lm.eval()
    with torch.no_grad():
        after = lm(seq)[0]
        fresh = fastmlstm.ByteLM(hidden_size=H, embed_size=I)
        fresh.load_state_dict(lm.state_dict())
        assert torch.equal(after, fresh(seq)[0]) and not torch.equal(after, before)


def _needs_cpu_extension():
    if not fastmlstm.backend_status("cpu", "cpu")[0]:
        pytest.skip("the CPU extension is unavailable")


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad])
def test_fused_optimizer_steps_are_seen(rnn, x, optimizer):
    """The fused CPU optimizers write the parameters without bumping their version counters: an
    evaluation between backward and step used to keep serving the weights from before the step."""
    opt = optimizer(rnn.parameters(), lr=0.1, fused=True)
    rnn(x)[0].pow(2).sum().backward()
    before = _assert_current(rnn, x)  # e.g. a validation pass before the step
    version = rnn.weight_hh_v._version
    opt.step()
    assert rnn.weight_hh_v._version == version  # (what made it stale)
    _assert_current(rnn, x, before)


def test_a_compiled_training_step_drops_the_cache(rnn, x):
    """A forward under autograd inside torch.compile drops the cache as an eager one does, so an
    update through .data after it (PyTorch's word_language_model example) is seen by the next
    eager inference call."""
    compiled = torch.compile(rnn, backend="eager", fullgraph=True)
    before = _assert_current(rnn, x)
    for _ in range(2):  # (the second call runs the compiled graph without tracing it again)
        compiled(x)[0].pow(2).sum().backward()
        for p in rnn.parameters():
            p.data.add_(p.grad, alpha=-0.5)
            p.grad = None
        before = _assert_current(rnn, x, before)


def _add_one_in_place(param):
    with torch.no_grad():
        param.add_(1.0)


def test_parameters_in_shared_memory_written_by_another_process(rnn, x):
    """Hogwild training (PyTorch's mnist_hogwild example): processes update share_memory()
    parameters in place, which no version counter of this process sees; they are fingerprinted."""
    mp = pytest.importorskip("torch.multiprocessing")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    rnn.share_memory()
    before = _assert_current(rnn, x)
    child = mp.get_context("fork").Process(target=_add_one_in_place, args=(rnn.weight_hm_g,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    _assert_current(rnn, x, before)


def test_a_new_storage_at_a_freed_address_is_not_taken_for_the_old_one(rnn, x):
    """.data assignment keeps a parameter's version counter, so a storage freed and a new one at
    the same address (the allocator reusing it: ``p.data = p.data * 0.5`` twice between two calls
    did so 5 times in 20 at H = 64) looked unchanged. The same address is reused here on purpose."""
    buf = torch.rand(H).numpy()
    rnn.weight_hm_g.data = torch.from_numpy(buf)
    before = _assert_current(rnn, x)
    version = rnn.weight_hm_g._version
    rnn.weight_hm_g.data = torch.ones(H)  # the first storage dies
    torch.from_numpy(buf).mul_(2.0)  # new values where it was, written through another tensor
    rnn.weight_hm_g.data = torch.from_numpy(buf)  # a new storage at the same address
    assert rnn.weight_hm_g._version == version and rnn.weight_hm_g.data_ptr() == buf.ctypes.data
    _assert_current(rnn, x, before)


def test_packed_copies_of_a_freed_storage_are_not_reused(x):
    """The backends' cache (ops.weight_cache.derived) had the same hole: without weight norm the
    parameters themselves are packed."""
    from fastmlstm.ops import weight_cache

    _needs_cpu_extension()
    rnn = FastMLSTM(I, H, weight_norm=False, backend="cpu")
    buf = torch.rand(H, H).numpy()
    rnn.weight_hm.data = torch.from_numpy(buf)
    first = _cached_output(rnn, x)
    rnn.weight_hm.data = torch.zeros(H, H)
    torch.from_numpy(buf).mul_(-1.0)
    rnn.weight_hm.data = torch.from_numpy(buf)
    out = _cached_output(rnn, x)
    weight_cache.clear()
    assert torch.equal(out, _cached_output(rnn, x)) and not torch.equal(out, first)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_swapping_parameters_after_a_forward(x, weight_norm):
    """The caches hold no weak reference to a parameter: torch.utils.swap_tensors (and module.to()
    under set_swap_module_params_on_conversion) refuses a tensor that has one."""
    _needs_cpu_extension()
    rnn = FastMLSTM(I, H, weight_norm=weight_norm, backend="cpu")
    with torch.no_grad():
        rnn(x)
        rnn.step(x[0])
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        rnn.to(torch.bfloat16)
        _assert_current(rnn, x.bfloat16())
        rnn.float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    name = "weight_hm_v" if weight_norm else "weight_hm"
    torch.utils.swap_tensors(getattr(rnn, name), nn.Parameter(torch.randn(H, H)))
    _assert_current(rnn, x)


def _cached_weight_ref(rnn):
    with torch.no_grad():
        ref = weakref.ref(rnn.effective_weights().weight_hh)
    gc.collect()
    assert ref() is not None  # (kept by the cache)
    return ref


def _collected(ref) -> bool:
    gc.collect()
    return ref() is None


def test_nothing_is_kept_for_parameters_that_moved_or_were_replaced(rnn, x, monkeypatch):
    """The cache holds nothing computed from storages the module no longer has (moved off the
    CPU, converted, replaced), nor anything once it is turned off."""
    ref = _cached_weight_ref(rnn)
    rnn.to("meta")  # (as to("cuda"): the CPU copies stay until the module dies otherwise)
    assert _collected(ref)
    rnn = FastMLSTM(I, H)
    ref = _cached_weight_ref(rnn)
    rnn.weight_hm_g = nn.Parameter(torch.ones(H))
    assert _collected(ref)
    ref = _cached_weight_ref(rnn)
    rnn.half()
    assert _collected(ref)
    ref = _cached_weight_ref(rnn)
    monkeypatch.setenv(modules.ENV_WEIGHT_CACHE, "off")
    _cached_output(rnn, x.half())
    assert _collected(ref)


def test_views_taken_per_call_do_not_pile_up_packed_copies(x):
    """The backends' cache keys an entry by what its tensors read, so a view taken per call (a new
    tensor object every time) replaces the last entry instead of adding one per call."""
    from fastmlstm.ops import weight_cache

    _needs_cpu_extension()
    weight_cache.clear()
    torch.manual_seed(0)
    stacked = FastMLSTM(I, H, weight_norm=False).effective_weights()
    layers = [w.detach().unsqueeze(0).repeat(2, *([1] * w.dim())) for w in stacked]
    outs = []
    with torch.no_grad():
        for _ in range(6):
            outs.append(fastmlstm.multiplicative_lstm(x, *(w[1] for w in layers), backend="cpu")[0])
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert len(weight_cache._ENTRIES) <= 4  # the packed copies of one call
