"""The persistent kernels' schedules executed on the CPU (fastmlstm/ops/triton/persistent/executor.py):
the recurrence they compute against the float64 truth and the reference backend (outputs, final
states, cell states, saved activations, every gradient; the <= 2x reference-error rule), through the
same host code that launches the kernels (launch.py), with CTAs interleaved in random orders; and
the flag protocol: each output tile finished exactly once per step, no deadlock, bounded waits."""

import pytest
import torch
from mlstm_f64 import recurrence_f64
from tolerances import ABS, FACTOR, REFERENCE, rel_err

from fastmlstm.ops import reference
from fastmlstm.ops.triton.configs import Device
from fastmlstm.ops.triton.persistent import executor, launch, schedule
from fastmlstm.ops.triton.persistent.executor import Deadlock, SpinTimeout

# (T, B, H, SMs, block_m, block_k, epilogue_rows, epilogue_values): T = 1; B = 1 and B not a
# multiple of 8; H not a multiple of the tiles; SM counts that leave one SM out of a cluster (7)
# and split K across many clusters; epilogue chunks small enough that the parts of a tile finish
# several slices, some of them empty.
SHAPES = [(1, 1, 24, 4, 8, 16, 4, 8), (5, 5, 40, 10, 16, 8, 4, 8), (3, 37, 72, 7, 32, 8, 8, 64)]


def _inputs(T, B, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, 5 * H, generator=g).to(dtype)
    w_hh = (torch.randn(4 * H, H, generator=g) / H ** 0.5).to(dtype)
    w_hm = (torch.randn(H, H, generator=g) / H ** 0.5).to(dtype)
    h0, c0 = 0.5 * torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    lengths = torch.tensor([(T * (b + 1)) // B for b in range(B)][::-1], dtype=torch.int64)
    if B > 2:
        lengths[1] = 0
    upstream = (torch.randn(T, B, H, generator=g).to(dtype), torch.randn(B, H, generator=g),
                torch.randn(T, B, H, generator=g))
    return proj, w_hh, w_hm, h0, c0, lengths, upstream


def _truth(proj, w_hh, w_hm, h0, c0, lengths, upstream):
    leaves = [x.double().requires_grad_() for x in (proj, w_hh, w_hm, h0, c0)]
    out, _, c_n, cells = recurrence_f64(*leaves, lengths)
    go, gc, gcs = (torch.zeros(()) if g is None else g for g in upstream)  # None: no gradient reached it
    ((out * go.double()).sum() + (c_n * gc.double()).sum() + (cells * gcs.double()).sum()).backward()
    return {"output": out, "c_n": c_n, "cells": cells, **{f"grad_{n}": x.grad for n, x in
                                                          zip(("proj", "w_hh", "w_hm", "h0", "c0"), leaves)}}


def _run(fwd, bwd, proj, w_hh, w_hm, h0, c0, lengths, upstream):
    out, c_n, cells, act = fwd(proj, w_hh, w_hm, h0, c0, lengths, True, True)
    grads = bwd(*upstream, w_hh, w_hm, h0, c0, lengths, out, cells, act)
    return {"output": out, "c_n": c_n, "cells": cells, "act": act,
            **dict(zip(("grad_proj", "grad_w_hh", "grad_w_hm", "grad_h0", "grad_c0"), grads))}


CASES = [(design, torch.bfloat16, shape, ragged, True) for design in schedule.DESIGNS for shape in SHAPES
         for ragged in (False, True)]
CASES += [(design, torch.float16, SHAPES[2], True, True) for design in schedule.DESIGNS]
# Only the outputs' gradient reaches the recurrence (no gradient for c_n or the cell states).
CASES += [("cluster", torch.bfloat16, SHAPES[1], True, False)]


@pytest.mark.parametrize("design, dtype, shape, ragged, all_grads", CASES,
                         ids=lambda v: str(v) if not isinstance(v, tuple) else "T{}-B{}-H{}-P{}".format(*v))
def test_schedule_computes_the_recurrence(design, dtype, shape, ragged, all_grads):
    T, B, H, sms, bm, bk, er, ev = shape
    proj, w_hh, w_hm, h0, c0, lengths, upstream = _inputs(T, B, H, dtype)
    lengths = lengths if ragged else None
    if not all_grads:
        upstream = (upstream[0], None, None)
    device, tiles = Device(sms, (9, 0)), {"block_m": bm, "block_k": bk, "epilogue_rows": er, "epilogue_values": ev}
    record = []

    def fwd(*args):
        return launch.forward(design, device, executor.runner("forward", seed=T + B, record=record), *args, tiles=tiles)

    def bwd(*args):
        return launch.backward(design, device, executor.runner("backward", seed=H, record=record), *args, tiles=tiles)

    got = _run(fwd, bwd, proj, w_hh, w_hm, h0, c0, lengths, upstream)
    ref = _run(reference.forward, reference.backward, proj, w_hh, w_hm, h0, c0, lengths, upstream)
    truth = _truth(proj, w_hh, w_hm, h0, c0, lengths, upstream)
    failures = []
    for name, value in truth.items():
        err_ref, err = rel_err(ref[name], value), rel_err(got[name], value)
        if err_ref > REFERENCE[dtype]:
            failures.append(f"reference {name}: {err_ref:.2e}")
        if err > FACTOR * err_ref + ABS[dtype]:
            failures.append(f"{name}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e} + {ABS[dtype]:.0e}")
    # The saved activations feed the backward of any backend: the same as the reference's.
    if rel_err(got["act"], ref["act"]) > ABS[dtype]:
        failures.append(f"act differs from the reference's by {rel_err(got['act'], ref['act']):.2e}")
    assert not failures, "\n".join(failures)
    # Each epilogue chunk of each output tile of each phase instance was finished exactly once.
    for sched, steps, finished in record:
        assert finished == _every_chunk_once(sched, steps)


def _every_chunk_once(sched, steps):
    instances = 2 * steps + (sched.direction == "backward")
    return {(n, m, c): 1 for n in range(instances) for m in range(sched.phases[n % 2].m_tiles)
            for c in range(sched.chunks(sched.phases[n % 2]))}


def test_every_part_finishes_a_slice():
    """The finish is spread over the parts: in the small shapes above, tiles with several parts
    have more than one part finishing chunks, and the slices of a tile cover its chunks once."""
    s = schedule.plan("cluster", "forward", 5, 40, 2, Device(10, (9, 0)), block_m=16, block_k=8, epilogue_rows=4,
                      epilogue_values=8)
    spread = 0
    for phase in s.phases:
        for m_tile in range(phase.m_tiles):
            parts = sorted((t for t in s.tiles if t.phase == phase.index and t.m_tile == m_tile), key=lambda t: t.part)
            slices = [s.finish_slice(phase, t.part, t.parts) for t in parts]
            assert slices[0][0] == 0 and slices[-1][1] == s.chunks(phase)
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
            spread += sum(1 for lo, hi in slices if hi > lo) > 1
    assert spread > 0


def test_a_partly_resident_schedule_computes_the_recurrence(monkeypatch):
    """The stationary design where only part of the weights fits shared memory (a small limit
    stands in for H = 2048's): the resident tiles and the streamed rest change where weights come
    from, not the result."""
    monkeypatch.setattr(schedule, "SMEM_PER_BLOCK", 3 * (16 + 16) * 8 * 2 + 4096 + 3 * 16 * 8 * 2)
    T, B, H = 3, 5, 40
    device, tiles = Device(10, (9, 0)), {"block_m": 16, "block_k": 8, "epilogue_rows": 4, "epilogue_values": 8}
    for direction in schedule.DIRECTIONS:
        sched = schedule.plan("stationary", direction, B, H, 2, device, **tiles)
        assert sched.streams and sched.res_blocks == 3 and sched.l2_weight_bytes_per_step > 0
    proj, w_hh, w_hm, h0, c0, lengths, upstream = _inputs(T, B, H, torch.bfloat16, seed=2)

    def fwd(*args):
        return launch.forward("stationary", device, executor.runner("forward", seed=3), *args, tiles=tiles)

    def bwd(*args):
        return launch.backward("stationary", device, executor.runner("backward", seed=4), *args, tiles=tiles)

    got = _run(fwd, bwd, proj, w_hh, w_hm, h0, c0, lengths, upstream)
    ref = _run(reference.forward, reference.backward, proj, w_hh, w_hm, h0, c0, lengths, upstream)
    truth = _truth(proj, w_hh, w_hm, h0, c0, lengths, upstream)
    for name, value in truth.items():
        assert rel_err(got[name], value) <= FACTOR * rel_err(ref[name], value) + ABS[torch.bfloat16], name


def test_split_k_is_exercised():
    """The small shapes above really split K over clusters (the parts' order matters)."""
    for direction in schedule.DIRECTIONS:
        s = schedule.plan("cluster", direction, 5, 40, 2, Device(10, (9, 0)), block_m=16, block_k=8)
        assert s.split_k >= 3


def _protocol_only(sched, T):
    """Hooks with no arithmetic: the flag protocol alone, at full size."""
    return executor.Hooks(partial=lambda *a: None, epilogue=lambda *a: None,
                          steps=[(t, 2 * t) for t in range(T)] if sched.direction == "forward"
                          else [(t, 2 * (T - 1 - t)) for t in range(T - 1, -1, -1)],
                          tail=2 * T if sched.direction == "backward" else None)


@pytest.mark.parametrize("direction", schedule.DIRECTIONS)
@pytest.mark.parametrize("design, H, B", [("cluster", 4096, 128), ("stationary", 1024, 64), ("stationary", 2048, 128)])
def test_model_schedules_never_deadlock_in_random_orders(design, H, B, direction):
    sched = schedule.plan(design, direction, B, H, 2, Device(132, (9, 0)))
    T = 2
    for seed in range(3):
        finished = executor.execute(sched, _protocol_only(sched, T), T, seed=seed, spin_limit=1 << 30)
        assert finished == _every_chunk_once(sched, T)


@pytest.mark.parametrize("direction", schedule.DIRECTIONS)
def test_a_missing_arrival_is_reported_naming_the_step(direction):
    """A CTA that never counts itself on a grid flag: the others cannot go on. With the deadlock
    detector the executor says so; as a spinning GPU would, the bounded wait gives up; both name
    the step."""
    sched = schedule.plan("cluster", direction, 5, 40, 2, Device(6, (9, 0)), block_m=16, block_k=8)
    T, fault = 3, (4, 2)  # CTA 4, phase instance 2
    step = "step 1," if direction == "forward" else "step 1,"
    with pytest.raises(Deadlock, match=step):
        executor.execute(sched, _protocol_only(sched, T), T, fault=fault)

    def spin_forever():
        stuck = executor.execute(sched, _protocol_only(sched, T), T, fault=fault, spin_limit=50)
        return stuck

    with pytest.raises((SpinTimeout, Deadlock), match=step):
        spin_forever()


def test_bounded_wait_gives_up_before_the_deadlock_is_certain():
    """A wait whose flag comes late, past the limit, gives up (what the kernels' time limit does)."""
    slow = [0]
    flag = [False]

    def late():
        for _ in range(200):
            slow[0] += 1
            yield None
        flag[0] = True

    def waiter():
        yield executor.Wait(lambda: flag[0], "a late flag at step 7")

    with pytest.raises(SpinTimeout, match="step 7"):
        executor.interleave({0: late(), 1: waiter()}, seed=0, spin_limit=5)
    flag[0], slow[0] = False, 0
    executor.interleave({0: late(), 1: waiter()}, seed=0, spin_limit=10_000)
    assert flag[0]


def test_error_word_names_the_step():
    sched = schedule.plan("cluster", "backward", 128, 4096, 2, Device(132, (9, 0)))
    assert "step 9, phase dm" in launch.error_message(sched, 2 * 0 + 1 + 1, T=10)
    assert "gradient of h0" in launch.error_message(sched, 2 * 10 + 1, T=10)
    fwd = schedule.plan("cluster", "forward", 128, 4096, 2, Device(132, (9, 0)))
    assert "step 3, phase z" in launch.error_message(fwd, 2 * 3 + 1 + 1, T=10)


def test_empty_sequence_and_inapplicable_shapes():
    proj, w_hh, w_hm, h0, c0, _, _ = _inputs(1, 3, 16, torch.bfloat16)
    device = Device(4, (9, 0))
    run = executor.runner("forward")
    out, c_n, cells, act = launch.forward("cluster", device, run, proj[:0], w_hh, w_hm, h0, c0, None, True, True)
    assert out.shape == (0, 3, 16) and cells.shape == (0, 3, 16) and act.shape == (0, 3, 96)
    assert torch.equal(c_n, c0)
    with pytest.raises(ValueError, match="multiple of 8"):
        odd = torch.zeros(1, 3, 5 * 12, dtype=torch.bfloat16)
        launch.forward("cluster", device, run, odd, w_hh[:48, :12], w_hm[:12, :12], h0[:, :12], c0[:, :12], None,
                       False, False)


def test_results_do_not_depend_on_the_order_ctas_run_in():
    """Parts are summed in part order whoever stores first: bitwise the same for every interleaving."""
    proj, w_hh, w_hm, h0, c0, lengths, upstream = _inputs(2, 5, 40, torch.bfloat16, seed=1)
    device, tiles = Device(10, (9, 0)), {"block_m": 16, "block_k": 8, "epilogue_rows": 4, "epilogue_values": 8}
    runs = []
    for seed in (0, 1):
        def fwd(*args, seed=seed):
            return launch.forward("cluster", device, executor.runner("forward", seed=seed), *args, tiles=tiles)

        def bwd(*args, seed=seed):
            return launch.backward("cluster", device, executor.runner("backward", seed=seed), *args, tiles=tiles)

        runs.append(_run(fwd, bwd, proj, w_hh, w_hm, h0, c0, lengths, upstream))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_the_kernels_get_row_major_lengths_and_gradients():
    """The kernels index lengths and the carried dc row-major: a strided lengths view (a column of a
    [B, 2] tensor) and a transposed gradient of c_n reach them as contiguous buffers."""
    T, B, H = 2, 5, 16
    proj, w_hh, w_hm, h0, c0, _, (grad_out, grad_c_n, _) = _inputs(T, B, H, torch.bfloat16, seed=5)
    lengths = torch.tensor([[2, 9], [0, 9], [1, 9], [2, 9], [1, 9]])[:, 0]
    seen = []

    def run(direction):
        inner = executor.runner(direction)

        def runner(sched, bufs):
            seen.append((direction, bufs.lengths.is_contiguous(), getattr(bufs, "dc", c0).is_contiguous()))
            inner(sched, bufs)

        return runner

    device, tiles = Device(4, (9, 0)), {"block_m": 16, "block_k": 8}
    out, _, cells, act = launch.forward("cluster", device, run("forward"), proj, w_hh, w_hm, h0, c0, lengths, True,
                                        False, tiles=tiles)
    launch.backward("cluster", device, run("backward"), grad_out, grad_c_n.t().contiguous().t(), None, w_hh, w_hm,
                    h0, c0, lengths, out, cells, act, tiles=tiles)
    assert seen == [("forward", True, True), ("backward", True, True)]
