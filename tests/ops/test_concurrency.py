"""The CPU backend under threads and processes: Python threads run its kernels at the same time
(torch releases the GIL inside operators), change the thread count between calls, train while
others infer, and fork or spawn children after first use.

Threads must get the results of a single-threaded run bit for bit (a row's forward never depends on
the thread count, nor, with the micro-kernel tiles, the backward: csrc/cpu/driver.h); the weight
caches (fastmlstm/ops/weight_cache.py, fastmlstm/nn/weight_cache.py) must never serve weights from
before an optimizer step that has ended, nor fail while another thread changes them; a forked child
must compute the same numbers and never hang. Every scenario that could hang runs in a subprocess
with a hard timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastmlstm
from fastmlstm.nn import weight_cache as nn_cache
from fastmlstm.ops import registry
from fastmlstm.ops import weight_cache as ops_cache

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = registry.backend_status("cpu", "cpu")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"the CPU extension is unavailable: {WHY}")
I = 12


def _recurrence():
    from fastmlstm.ops.cpu import recurrence

    return recurrence


@pytest.fixture
def switch_often():
    """Python switches threads every few microseconds, so that races show within a short test."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


@pytest.fixture
def two_threads():
    """Two intra-op threads (the loops split their work), restored after the test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _module(H, dtype=torch.float32, weight_norm=True):
    torch.manual_seed(H)
    return fastmlstm.FastMLSTM(I, H, weight_norm=weight_norm, backend="cpu", dtype=dtype)


def _jobs(H=64):
    """name -> a call returning tensors: forward, forward + backward and step loops on modules of
    two sizes and dtypes (and one without weight norm: its parameters are packed directly), and
    ByteLM.generate; 16 rows, enough for the loops to split rows and columns over two threads."""
    x = torch.randn(6, 16, I)
    m32, m16, plain = _module(H), _module(H + 32, torch.bfloat16), _module(H // 2, weight_norm=False)
    lm = fastmlstm.ByteLM(hidden_size=H, embed_size=8, backend="cpu")

    def forward(m, x):
        with torch.no_grad():
            out, (h, c) = m(x)
        return [out, h, c]

    def forward_backward(m, x):
        xx = x.clone().requires_grad_(True)
        out, (_, c) = m(xx)
        return [out.detach(), *torch.autograd.grad(out.float().pow(2).sum() + c.sum(), [xx, *m.parameters()])]

    def steps(m, x):
        outs, state = [], None
        with torch.no_grad():
            for t in range(x.shape[0]):
                out, state = m.step(x[t], state)
                outs.append(out)
        return [torch.stack(outs), *state]

    def generate():
        return [torch.tensor(list(b"".join(lm.generate("ab", 12, num_samples=4, seed=3))))]

    jobs = {"generate": generate}
    for name, m, xm in (("f32", m32, x), ("bf16", m16, x.bfloat16()), ("plain", plain, x)):
        jobs[f"forward_{name}"] = lambda m=m, xm=xm: forward(m, xm)
        jobs[f"backward_{name}"] = lambda m=m, xm=xm: forward_backward(m, xm)
        jobs[f"step_{name}"] = lambda m=m, xm=xm: steps(m, xm[:, :3])
    return jobs


def _run_threads(jobs, expected, workers=3, rounds=2, before_call=None):
    """Every job ``rounds`` times in each of ``workers`` threads (in a different order per thread);
    returns the jobs whose results differed from ``expected`` (and the errors)."""
    failures = []

    def work(k):
        names = list(jobs)[::-1] if k % 2 else list(jobs)
        try:
            for r in range(rounds):
                for name in names:
                    if before_call is not None:
                        before_call(k, r)
                    got = jobs[name]()
                    if not all(torch.equal(a, b) for a, b in zip(got, expected[name])):
                        failures.append(name)
        except Exception as exc:  # noqa: BLE001  (reported by the test)
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return failures


def test_threads_on_shared_modules_get_the_single_threaded_results(two_threads):
    jobs = _jobs()
    expected = {name: job() for name, job in jobs.items()}
    assert _run_threads(jobs, expected) == []


def test_thread_counts_changed_between_calls_and_from_other_threads(two_threads):
    """torch.set_num_threads between calls (each worker alternates 1 and 2) and from another thread
    all along: the results stay bit for bit those of one thread."""
    if not _recurrence().float32_micro_kernels():
        pytest.skip("ATen's gemm fallback may sum in another order at another thread count")
    jobs = _jobs(48)
    with _recurrence().forced_weight_grad_gemm("tiles"):
        torch.set_num_threads(1)
        expected = {name: job() for name, job in jobs.items()}
        done = threading.Event()

        def flip():
            n = 0
            while not done.is_set():
                torch.set_num_threads(1 + n % 2)
                n += 1

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            failures = _run_threads(jobs, expected, before_call=lambda k, r: torch.set_num_threads(1 + (k + r) % 2))
        finally:
            done.set()
            flipper.join()
    assert failures == []


def _trained_plain_module(fused):
    """A module without weight norm (the kernels pack its parameters themselves) after two training
    steps of an Adam, and a fresh module with its weights."""
    m = _module(32, weight_norm=False)
    x = torch.randn(5, 4, I)
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=fused)
    for _ in range(2):
        m(x)[0].pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = _module(32, weight_norm=False)
    fresh.load_state_dict(m.state_dict())
    return m, fresh, x


@pytest.mark.parametrize("fused", [False, True])
def test_packed_parameters_follow_a_fused_optimizer(fused):
    """A fused CPU optimizer writes the parameters without bumping their version counters: the
    packed copies of a weight_norm=False module's parameters stayed those of the first forward, and
    training went on with them (and so did inference after it)."""
    m, fresh, x = _trained_plain_module(fused)
    assert torch.equal(m(x)[0], fresh(x)[0])
    with torch.no_grad():
        assert torch.equal(m(x)[0], fresh(x)[0])


def test_packed_parameters_follow_updates_through_data():
    """A training loop that updates the parameters through ``.data`` (PyTorch's word_language_model
    example) bumps no version counter: the packed copies of a weight_norm=False module's (or byte
    model's) parameters stayed those of the first forward, and training went on with them."""
    torch.manual_seed(0)
    rnn, x = _module(32, weight_norm=False), torch.randn(5, 4, I)
    lm = fastmlstm.ByteLM(hidden_size=32, embed_size=8, weight_norm=False, backend="cpu")
    text = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
    for model, inputs, fresh in ((rnn, x, _module(32, weight_norm=False)),
                                 (lm, text, fastmlstm.ByteLM(hidden_size=32, embed_size=8, weight_norm=False, backend="cpu"))):
        for _ in range(2):
            model(inputs)[0].float().pow(2).sum().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.05)
                p.grad = None
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(model(inputs)[0], fresh(inputs)[0])
        with torch.no_grad():
            assert torch.equal(model(inputs)[0], fresh(inputs)[0])


def _step_between(compute, step):
    """Runs ``compute(pause)`` in a thread, and ``step`` (an optimizer step in another thread) in this
    one while compute waits in ``pause()``: after it has read the weights, before it returns."""
    read, stepped = threading.Event(), threading.Event()

    def pause():
        read.set()
        assert stepped.wait(30)

    worker = threading.Thread(target=compute, args=(pause,))
    worker.start()
    assert read.wait(30)
    step()
    stepped.set()
    worker.join(30)
    assert not worker.is_alive()


def test_effective_weights_computed_across_a_fused_step_are_not_kept():
    m, x = _module(24), torch.randn(4, 3, I)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, fused=True)
    m(x)[0].pow(2).sum().backward()

    def infer(pause):
        def compute():  # the module's own computation, paused once it has read the parameters
            weights = m._all_weights()
            pause()
            return weights

        with torch.no_grad():
            nn_cache.cached_weights(m, compute)

    _step_between(infer, opt.step)
    with torch.no_grad():
        fresh = fastmlstm.multiplicative_lstm(x, *m._compute_effective_weights(), backend="cpu")[0]
        assert torch.equal(m(x)[0], fresh)


def test_effective_weights_computed_across_a_parameter_swap_are_not_kept():
    """Another thread replaces a parameter while the cache computes the weights from the module: the
    computation read the new one, the entry was kept under the old one's key, and when the old one
    came back the weights of the new one came with it."""
    m, x = _module(24), torch.randn(4, 3, I)
    old, new = m.weight_hh_v, torch.nn.Parameter(m.weight_hh_v.detach() * 2 + 1)

    def infer(pause):
        def compute():  # paused before it reads the parameters
            pause()
            return m._all_weights()

        with torch.no_grad():
            nn_cache.cached_weights(m, compute)

    _step_between(infer, lambda: setattr(m, "weight_hh_v", new))
    m.weight_hh_v = old
    with torch.no_grad():
        fresh = fastmlstm.multiplicative_lstm(x, *m._compute_effective_weights(), backend="cpu")[0]
        assert torch.equal(m(x)[0], fresh)


def test_packs_made_before_or_across_a_fused_step_are_not_kept():
    """What the backends derived from a parameter before a fused optimizer stepped it, or while it
    did (in another thread), goes with the step."""
    m = _module(24, weight_norm=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, fused=True)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    weight = m.weight_hh
    ops_cache.derived([weight], "test copy before", weight.clone)  # (derived before the step)

    def pack(pause):
        def copy():
            value = weight.clone()
            pause()
            return value

        ops_cache.derived([weight], "test copy", copy)

    _step_between(pack, opt.step)
    for kind in ("test copy", "test copy before"):
        assert torch.equal(ops_cache.derived([weight], kind, weight.clone), weight)


def test_optimizer_steps_while_another_thread_makes_and_drops_entries():
    """The optimizer hook reads every cache entry while other threads add and drop some: a step
    failed with 'dictionary changed size during iteration'. Another thread's turn comes between two
    Python lines; a trace function takes it there, deterministically, wherever the hook runs Python
    code while it reads the entries."""
    modules = [_module(4) for _ in range(3)]
    with torch.no_grad():
        for m in modules[:2]:
            m.effective_weights()
    weights = modules[2]._all_weights()
    weight = torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.zeros(1)
    opt = torch.optim.SGD([weight], lr=0.01)
    turns = []

    def other_thread(frame, event, arg):
        # (inside a loop over a weak dictionary, once it has begun: "wr" is the loop's variable)
        if event == "line" and "wr" in frame.f_locals and not turns:
            with torch.no_grad():  # an entry added
                nn_cache.cached_weights(modules[2], lambda: weights)
            turns.append(event)
        return other_thread

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: other_thread if frame.f_code.co_filename.endswith("weakref.py") else None)
    try:
        opt.step()
    finally:
        sys.settrace(previous)
    assert nn_cache._ENTRIES.get(modules[0]) is not None  # (entries of parameters not stepped stay)


def test_steps_of_more_batch_sizes_than_are_kept_from_several_threads(switch_often):
    """More batch sizes than an entry keeps prepared steps for (nn.weight_cache.MAX_MEMOS), from
    three threads: every step gets the numbers of the functional step."""
    m = _module(16)
    errors = []

    def work(k):
        try:
            with torch.no_grad():
                for r in range(60):
                    x = torch.randn(1 + (7 * r + 5 * k) % (3 * nn_cache.MAX_MEMOS), I)
                    expected = fastmlstm.multiplicative_lstm_step(x, *m._compute_effective_weights(), backend="cpu")
                    assert torch.equal(m.step(x)[0], expected[0])
        except Exception as exc:  # noqa: BLE001  (reported by the test)
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_prepared_steps_evicted_by_two_threads_at_once():
    """Two threads evicting an entry's oldest prepared step at once (nn.weight_cache.MAX_MEMOS):
    between one thread's reading the oldest key and its deleting it, the other deleted it first
    (KeyError), or between its starting to iterate and reading, added one (a dictionary changed
    during iteration). A trace function gives the other thread its turn before every bytecode of the
    eviction, deterministically."""
    entry = nn_cache._Entry((), (), None, ())
    for k in range(nn_cache.MAX_MEMOS):
        entry.memo(("batch", k), lambda: None)
    turns = []

    def other_thread(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode" and len(turns) < 200:
            turns.append(event)
            entry.memo(("other thread", len(turns)), lambda: None)
        return other_thread

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: other_thread if frame.f_code.co_name == "memo" else None)
    try:
        assert entry.memo(("batch", "new"), lambda: "made") == "made"
    finally:
        sys.settrace(previous)
    assert turns and len(entry.memos) <= nn_cache.MAX_MEMOS + 1


def _run_script(script, timeout):
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


FORK_SCRIPT = r'''
import faulthandler, multiprocessing as mp, threading, torch, fastmlstm
from fastmlstm.ops.cpu import recurrence
torch.set_num_threads(2)
# x's gradient is independent of the thread count where the GEMMs beside the loop run as tiles
exact = recurrence.float32_micro_kernels() and recurrence.kernel_report()["weight_grad_gemm"] == "tiles"
torch.manual_seed(0)
m = fastmlstm.FastMLSTM(12, 64, backend="cpu")
x = torch.randn(6, 16, 12)

def train_and_infer():
    xx = x.clone().requires_grad_(True)
    out = m(xx)[0]
    out.pow(2).sum().backward()
    with torch.no_grad():
        # (and one of torch's own parallel loops; not torch.randn: a fork while another thread holds
        # torch's default generator's lock deadlocks the child in torch itself)
        torch.full((512, 512), 0.5).exp().sum()
        return out.detach(), xx.grad, m(x)[0]

expected = train_and_infer()

def child(queue):
    faulthandler.dump_traceback_later(25, exit=True)
    got = train_and_infer()
    same = [torch.equal(a, b) or (k == 1 and not exact and torch.allclose(a, b, rtol=1e-5, atol=1e-6))
            for k, (a, b) in enumerate(zip(got, expected))]
    queue.put(all(same))

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        with torch.no_grad():
            return torch.equal(m(x)[0], expected[2])

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    busy = threading.Event()
    def keep_busy():  # kernels and buffer-cache traffic in another thread while the children fork
        while not busy.is_set():
            train_and_infer()
    worker = threading.Thread(target=keep_busy)
    for k in range(6):
        if k == 1:
            worker.start()
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,), daemon=True)
        proc.start()
        print("child", k, queue.get(timeout=30))
        proc.join(30)
    busy.set()
    worker.join()
    loader = torch.utils.data.DataLoader(Rows(), num_workers=2, batch_size=None, multiprocessing_context="fork",
                                         timeout=30)
    print("loader", all(loader))
'''


def test_forked_children_compute_the_parents_results():
    """After the parent ran the backend on two threads, a child forked by multiprocessing (also while
    another thread runs kernels) or a DataLoader worker computes the same numbers: before, the
    child's first parallel loop waited forever for OpenMP threads that did not survive the fork.
    Where the float32 GEMMs fall back to BLAS (oneDNN's micro-kernels capped, as in the no-AVX2
    emulation of docs/development.md), that BLAS is MKL here, and a forked child could hang inside
    MKL's own allocator (mkl_serv_allocate, 1 run in 2-3): not this library's to fix (the x86 CPUs
    with AVX2 that CI runs on never take that path; docs/backends.md says to use 'spawn' there)."""
    if not _recurrence().float32_micro_kernels():
        pytest.skip("the BLAS fallback's MKL is not fork-safe (a child hung in mkl_serv_allocate)")
    out = _run_script(FORK_SCRIPT, timeout=150)
    assert out.splitlines() == [*(f"child {k} True" for k in range(6)), "loader True"], out


BUFFER_CACHE_FORK_SCRIPT = r"""
import faulthandler, multiprocessing as mp, threading, torch
from fastmlstm.ops.cpu import recurrence
torch.set_num_threads(1)
ops, H = recurrence._ops(), 8
hh, hm = recurrence._packed(torch.randn(4 * H, H), "hh"), recurrence._packed(torch.randn(H, H), "hm")
proj = torch.randn(1, 2, 5 * H)

def forward(B):  # a training forward: its saved activations come from the buffer cache
    zeros = torch.zeros(B, H)
    return ops.forward(proj[:, :B].contiguous(), hh, hm, zeros, zeros, None, True, False, False, False)

# Many small cached blocks: every request then scans them all under the cache's lock.
held = [forward(1) for _ in range(75000)]
del held

def child(queue):
    faulthandler.dump_traceback_later(5, exit=True)
    forward(2)
    queue.put(True)

if __name__ == "__main__":
    stop = threading.Event()
    def churn():
        while not stop.is_set():
            forward(2)
    worker = threading.Thread(target=churn)
    worker.start()
    ctx = mp.get_context("fork")
    try:
        for k in range(10):
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,), daemon=True)
            proc.start()
            print("child", k, queue.get(timeout=10))
            proc.join(10)
    finally:
        stop.set()
        worker.join()
"""


def test_a_child_forked_while_another_thread_holds_the_buffer_cache_lock():
    """A thread of the parent in the buffer cache (csrc/cpu/buffer_cache.cpp) holds its lock when
    another thread forks: the child's first training forward waited for that lock forever."""
    out = _run_script(BUFFER_CACHE_FORK_SCRIPT, timeout=120)
    assert out.splitlines() == [f"child {k} True" for k in range(10)], out
