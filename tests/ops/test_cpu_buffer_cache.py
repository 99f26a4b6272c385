"""The CPU backend's buffer cache (csrc/cpu/buffer_cache.cpp, fastmlstm/ops/cpu/buffer_cache.py): the
activations a training forward saves come from blocks that outlive their tensors; the next forward
reuses them, results stay bitwise those of fresh memory, the limit and ``empty_cache`` hold, and
``$FASTMLSTM_CPU_CACHE_MB`` is checked like every other option.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fastmlstm
from fastmlstm.errors import InputError
from fastmlstm.ops import interface, registry

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = registry.backend_status("cpu", "cpu")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"the CPU extension is unavailable: {WHY}")
T, B, I, H = 7, 3, 5, 24


def _cache():
    from fastmlstm.ops.cpu import buffer_cache

    return buffer_cache


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(_cache().ENV_CACHE_MB, raising=False)
    _cache().empty_cache()
    yield
    _cache().empty_cache()


def _weights(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    return dict(weight_ih=w(4 * H, I), weight_im=w(H, I), bias=w(4 * H), weight_hh=w(4 * H, H), weight_hm=w(H, H))


def _forward(x, w, save=True):
    from fastmlstm.ops.cpu import layer

    zeros = torch.zeros(x.shape[1], H)
    return layer.layer_forward(x, w["weight_ih"], w["weight_im"], w["bias"], w["weight_hh"], w["weight_hm"],
                               zeros, zeros, None, save, False)


def test_a_training_forward_reuses_the_block_the_last_one_freed():
    x = torch.randn(T, B, I)
    saved = _forward(x, _weights())
    ptrs = {t.data_ptr() for t in saved[2:]}  # the cell states and act
    nbytes = sum(t.numel() * t.element_size() for t in saved[2:])
    assert _cache().cached_bytes() == 0
    del saved
    assert _cache().cached_bytes() == nbytes
    again = _forward(x, _weights())
    assert {t.data_ptr() for t in again[2:]} == ptrs and _cache().cached_bytes() == 0
    del again
    assert _cache().empty_cache() == nbytes and _cache().cached_bytes() == 0


def test_a_block_more_than_a_quarter_too_large_is_not_taken():
    act = _forward(torch.randn(4 * T, B, I), _weights())[3]
    ptr = act.data_ptr()
    del act
    assert _forward(torch.randn(T, B, I), _weights())[3].data_ptr() != ptr  # 4x smaller: new memory
    assert _forward(torch.randn(4 * T - 1, B, I), _weights())[3].data_ptr() == ptr  # within a quarter


@pytest.mark.parametrize("limit_mb", ["0", "1"])
def test_the_limit_is_what_the_environment_says(monkeypatch, limit_mb):
    monkeypatch.setenv(_cache().ENV_CACHE_MB, limit_mb)
    act = _forward(torch.randn(T, B, I), _weights())[3]  # the cell states die here: 2 KiB
    nbytes = act.numel() * act.element_size()  # 12 KiB
    del act
    small = _cache().cached_bytes()
    assert small == (0 if limit_mb == "0" else nbytes + T * B * H * 4)
    big = _forward(torch.randn(T, 2048, I), _weights())  # act 8 MiB, over the limit: never cached
    del big
    assert _cache().cached_bytes() <= (0 if limit_mb == "0" else 1 << 20)


@pytest.mark.parametrize("value", ["-1", "1.5", "nan", "lots"])
def test_a_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(_cache().ENV_CACHE_MB, value)
    with pytest.raises(InputError, match="FASTMLSTM_CPU_CACHE_MB must be an integer >= 0"):
        _forward(torch.randn(T, B, I), _weights())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_memory_gives_the_results_of_fresh_memory(monkeypatch, dtype):
    """Stale activations of another input in the reused block change nothing, bit for bit: the
    forward writes every element it saves (the suite's NaN poisoning is off here, so that stale
    values, not NaN, fill the block)."""
    monkeypatch.setattr(interface, "POISON_BUFFERS", False)

    def training_step():
        torch.manual_seed(1)
        rnn = fastmlstm.FastMLSTM(I, H, backend="cpu", dtype=dtype)
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
        out, (h, c) = rnn(x)
        (out.float().square().sum() + c.sum()).backward()
        return [out, h, c, x.grad] + [p.grad for p in rnn.parameters()]

    monkeypatch.setenv(_cache().ENV_CACHE_MB, "0")
    fresh = training_step()
    monkeypatch.delenv(_cache().ENV_CACHE_MB)
    for seed in range(2):  # leave other activations in the cache, then reuse them
        torch.manual_seed(seed + 10)
        training_step()
    assert _cache().cached_bytes() > 0
    reused = training_step()
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)


def test_a_training_loop_holds_one_block_between_iterations():
    """What the docs promise: the cache holds, between iterations, the memory the next forward takes,
    and does not grow with the number of iterations."""
    torch.manual_seed(0)
    rnn = fastmlstm.FastMLSTM(I, H, backend="cpu")
    opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
    x = torch.randn(T, B, I)
    held = []
    for _ in range(4):
        out, _ = rnn(x)
        assert _cache().cached_bytes() == 0  # the forward took what the last backward gave back
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        held.append(_cache().cached_bytes())
    assert held == [T * B * 7 * H * 4] * 4  # act [T, B, 6H] and the cell states, float32


def test_setup_builds_the_sources_the_first_use_build_compiles():
    from fastmlstm.ops.cpu import build

    tree = ast.parse((REPO / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CPU_SOURCES")
    assert tuple(listed) == tuple(build.SOURCES)
