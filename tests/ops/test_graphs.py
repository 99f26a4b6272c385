"""CUDA graphs' host side on a CPU (fastmlstm/ops/capture.py, fastmlstm/ops/triton/graphs.py): the
capture's stand-in replays on the same static buffers a graph would, so the copies in and out, the
skipped weight copies, the cache and its bounds, and the graphed step loop's results (equal to the
per-step path's, call after call) are checked here; the real capture runs on a GPU (gpu_check)."""

import logging

import pytest
import torch

from fastmlstm.ops import capture, verdicts
from fastmlstm.ops.triton import dispatch, graphs, recurrence

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_graphs(monkeypatch):
    """No graphs kept from another test; graphs at the few steps the interpreter runs quickly."""
    graphs.clear()
    monkeypatch.setattr(graphs, "MIN_T", 1)
    yield
    graphs.clear()


def test_the_stand_in_replays_on_the_static_buffers():
    x = torch.zeros(3)
    replay, (double, nothing, [plus]) = capture.capture(lambda: (x * 2, None, [x + 1]), CPU)
    x.copy_(torch.tensor([1.0, 2.0, 3.0]))
    replay()
    assert double.tolist() == [2.0, 4.0, 6.0] and nothing is None and plus.tolist() == [2.0, 3.0, 4.0]
    sizes = iter([3, 4])
    replay, _ = capture.capture(lambda: torch.zeros(next(sizes)), CPU)
    with pytest.raises(RuntimeError, match="another shape"):
        replay()


def test_static_inputs_copy_what_changed_and_skip_an_unchanged_weight():
    weight, x = torch.randn(4, 4), torch.randn(2, 4)
    static = capture.StaticInputs({"weight": weight, "x": x, "lengths": None})
    static.load({"weight": weight, "x": x, "lengths": None})
    assert static.copies == 2 and torch.equal(static.buffers["weight"], weight)
    static.load({"weight": weight, "x": torch.randn(2, 4), "lengths": None})
    assert static.copies == 3  # the same weight, unchanged: not copied again
    with torch.no_grad():
        weight.mul_(2)  # an in-place update (an optimizer step) bumps the version: copied
    static.load({"weight": weight, "x": x, "lengths": None})
    assert static.copies == 5 and torch.equal(static.buffers["weight"], weight)
    other = weight.clone()  # equal values, another tensor: copied
    static.load({"weight": other, "x": x, "lengths": None})
    assert static.copies == 6
    with pytest.raises(ValueError, match="'lengths' is None in one call"):
        static.load({"weight": weight, "x": x, "lengths": torch.ones(2)})


def test_the_cache_keeps_the_most_recent_graphs_within_its_bounds():
    cache = capture.GraphCache(max_entries=2, max_bytes=100)
    assert cache.put("a", 1, 40) and cache.put("b", 2, 40)
    assert cache.get("a") == 1  # now b is the least recently used
    assert cache.put("c", 3, 40)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.put("d", 4, 90) and len(cache) == 1 and cache.held_bytes() == 90  # bytes bound evicts both
    assert not cache.put("e", 5, 101) and cache.get("e") is None and cache.get("d") == 4


def _inputs(T=3, B=2, H=16, dtype=torch.float32, lengths=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, 5 * H, generator=g).to(dtype)
    w_hh = (torch.randn(4 * H, H, generator=g) / H ** 0.5).to(dtype)
    w_hm = (torch.randn(H, H, generator=g) / H ** 0.5).to(dtype)
    h0, c0 = torch.randn(B, H, generator=g) / 2, torch.randn(B, H, generator=g)
    lens = torch.tensor([T, 1][:B] + [T] * max(0, B - 2)) if lengths else None
    return proj, w_hh, w_hm, h0, c0, lens


@pytest.mark.parametrize("dtype,lengths,cells", [(torch.float32, False, False), (torch.bfloat16, True, True)])
def test_the_graphed_loop_equals_the_per_step_path_call_after_call(dtype, lengths, cells):
    _, w_hh, w_hm, *_ = _inputs(dtype=dtype, lengths=lengths)
    kept = None
    for seed in (1, 2):  # the same shapes with new values: one capture, replayed on the copies
        proj, _, _, h0, c0, lens = _inputs(dtype=dtype, lengths=lengths, seed=seed)
        got = graphs.forward(proj, w_hh, w_hm, h0, c0, lens, True, cells)
        want = recurrence.forward(proj, w_hh, w_hm, h0, c0, lens, True, cells)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        grads = (torch.randn_like(want[0]), torch.randn_like(want[1]), torch.randn_like(want[2]) if cells else None)
        got_grads = graphs.backward(*grads, w_hh, w_hm, h0, c0, lens, *got[0:1], got[2], got[3])
        want_grads = recurrence.backward(*grads, w_hh, w_hm, h0, c0, lens, want[0], want[2], want[3])
        assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
        if kept is None:
            kept = [t.clone() for t in got], got
    assert graphs._CACHE.captures == 2  # one forward and one backward graph
    # Results are the caller's: a later replay does not overwrite them.
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_another_shape_or_plan_is_another_graph():
    proj, w_hh, w_hm, h0, c0, _ = _inputs()
    graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    graphs.forward(proj[:2], w_hh, w_hm, h0, c0, None, False, False)
    graphs.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
    assert graphs._CACHE.captures == 3
    from fastmlstm.ops.triton import configs

    with configs.override(configs.INTERPRETER_CONFIG):
        graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert graphs._CACHE.captures == 4
    # TF32 switched on: the kernels launch with another dot precision, so the capture cannot be replayed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recurrence, "_dot_precision", lambda dtype: "tf32")
        graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert graphs._CACHE.captures == 5


def test_inside_someone_elses_capture_too_short_or_too_big_the_step_path_runs(monkeypatch):
    proj, w_hh, w_hm, h0, c0, _ = _inputs()
    monkeypatch.setattr(graphs, "MIN_T", 4)
    out = graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert graphs._CACHE.captures == 0 and out[0].shape[0] == 3 < graphs.MIN_T
    monkeypatch.setattr(graphs, "MIN_T", 1)
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    out = graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert graphs._CACHE.captures == 0 and torch.equal(out[0], recurrence.forward(proj, w_hh, w_hm, h0, c0, None,
                                                                                  False, False)[0])
    monkeypatch.setattr(capture, "capturing", lambda device: False)
    monkeypatch.setattr(graphs._CACHE, "max_bytes", 1000)
    graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert graphs._CACHE.captures == 0


def test_a_failed_capture_is_logged_once_and_the_step_path_runs(monkeypatch, caplog):
    proj, w_hh, w_hm, h0, c0, _ = _inputs()

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(capture, "capture", broken)
    verdicts.log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastmlstm"):
        for _ in range(2):
            out = graphs.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert torch.equal(out[0], recurrence.forward(proj, w_hh, w_hm, h0, c0, None, False, False)[0])
    assert sum("capturing the forward step loop as a CUDA graph failed" in r.message for r in caplog.records) == 1


def test_the_graph_candidate_passes_the_dispatch_check(monkeypatch):
    monkeypatch.setattr(dispatch, "CASES", ((2, True, True),))
    monkeypatch.setattr(dispatch, "TIMING_T", 1)
    monkeypatch.setattr(verdicts, "time_ms", lambda fn, device, reps=5, warmup=1: (fn(), 1.0)[1])
    [candidate] = graphs.candidates()
    assert candidate.name == "graph" and candidate.applies(64, 1024, torch.bfloat16, dispatch.Device(132, (9, 0)))
    assert not candidate.applies(64, 4096, torch.bfloat16, dispatch.Device(132, (9, 0)))
    verdict = dispatch.check(candidate, 2, 16, torch.float32, CPU)
    assert verdict.passed, verdict.reason
    errors = verdict.errors["T=2 with lengths and cell states"]
    assert all(e["candidate"] == e["tested"] for e in errors.values())  # the same kernels, replayed
    assert graphs._CACHE.captures > 0


def test_a_step_graph_keeps_its_state_between_replays():
    weight = torch.tensor([[0.5, 0.0], [0.0, 2.0]])

    def step(inputs, state):
        (h,) = state
        h_next = h @ weight + inputs["x"]
        return (h_next.sum(dim=1),), (h_next,)

    h0 = torch.ones(1, 2)
    graph = capture.StepGraph(step, {"x": torch.zeros(1, 2)}, (h0,), CPU)
    assert torch.equal(graph.state[0], h0)  # capturing did not advance it
    h, outs = h0.clone(), []
    for value in (1.0, 2.0, 3.0):
        x = torch.full((1, 2), value)
        outs.append(graph({"x": x})[0])
        h = h @ weight + x
        assert torch.equal(graph.state[0], h) and torch.equal(outs[-1], h.sum(dim=1))
    assert outs[0].item() != outs[1].item()  # clones: an earlier output was not overwritten
    graph.load_state((h0,))
    assert torch.equal(graph({"x": torch.zeros(1, 2)})[0], (h0 @ weight).sum(dim=1))


# --------------------------------------------------------------------- the generation step

@pytest.fixture
def graphed_generation(monkeypatch, tmp_path):
    """A stand-in GPU for ByteLM.generate's step: the capture's stand-in on CPU tensors."""
    from fastmlstm.models import generation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(verdicts.ENV_KERNEL, raising=False)
    monkeypatch.setattr(verdicts, "site_of", lambda device: verdicts.Site(device, "Test GPU", (9, 0), 8, "d", "r"))
    monkeypatch.setattr(generation.ByteStepper, "_may_graph",
                        lambda self: verdicts.kernel_choice() in ("auto", "graph"))
    monkeypatch.setattr(generation, "TIMING_STEPS", 2)
    replays = []
    real_call = capture.StepGraph.__call__
    monkeypatch.setattr(capture.StepGraph, "__call__",
                        lambda self, inputs: replays.append(1) or real_call(self, inputs))
    verdicts.forget_process_memory()
    yield generation, replays, tmp_path / "fastmlstm" / "kernels"
    verdicts.forget_process_memory()


def _generate(model, monkeypatch, kernel, **kwargs):
    monkeypatch.setenv(verdicts.ENV_KERNEL, kernel)
    return model.generate("ab", 6, num_samples=3, **kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"seed": 3, "fixed_units": {1: 0.5, 5: -1.0}}])
def test_the_graphed_generation_step_samples_what_the_eager_step_samples(graphed_generation, monkeypatch, kwargs):
    from fastmlstm import ByteLM

    _, replays, cache = graphed_generation
    torch.manual_seed(0)
    model = ByteLM(hidden_size=16, embed_size=8, backend="reference")
    eager = _generate(model, monkeypatch, "step", **kwargs)
    assert not replays
    graphed = _generate(model, monkeypatch, "graph", **kwargs)
    assert graphed == eager and len(replays) >= 4  # the check's bytes, then the samples' steps
    [stored] = [p for p in cache.glob("generate-graph-*.json")]
    assert '"status": "passed"' in stored.read_text()


def test_a_generation_graph_that_fails_its_check_is_not_used(graphed_generation, monkeypatch, caplog):
    from fastmlstm import ByteLM

    generation, replays, _ = graphed_generation
    model = ByteLM(hidden_size=16, embed_size=8, backend="reference")
    eager = _generate(model, monkeypatch, "step", temperature=0)

    original = generation.ByteStepper._graph_step

    def stale(self, inputs, state):  # a graph that forgets to carry its state
        return original(self, inputs, state)[0], state

    monkeypatch.setattr(generation.ByteStepper, "_graph_step", stale)
    with caplog.at_level(logging.WARNING, logger="fastmlstm"):
        assert _generate(model, monkeypatch, "auto", temperature=0) == eager
    assert sum("generation step failed its check" in r.message and "differs from the eager step" in r.message
               for r in caplog.records) == 1
    replays.clear()
    assert _generate(model, monkeypatch, "auto", temperature=0) == eager and not replays  # the verdict is kept


@pytest.mark.parametrize("faster", [True, False])
def test_the_generation_graph_runs_only_where_it_is_faster(graphed_generation, monkeypatch, caplog, faster):
    from fastmlstm import ByteLM

    generation, replays, _ = graphed_generation
    times = (2.0, 1.0) if faster else (1.0, 1.0)  # (eager, graph) per TIMING_STEPS steps, as compare_ms gives them
    monkeypatch.setattr(verdicts, "compare_ms", lambda tested, candidate, device, rounds=5: times)
    model = ByteLM(hidden_size=16, embed_size=8, backend="reference")
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        _generate(model, monkeypatch, "auto", temperature=0)
    after_check = generation.CHECK_STEPS
    assert (len(replays) > after_check) == faster
    want = "run as one CUDA graph" if faster else "is not faster"
    assert sum(want in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------ on a real GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_cuda_graphs_replay_the_per_step_path(dtype):
    from tolerances import ABS, rel_err

    cuda = torch.device("cuda")
    _, w_hh, w_hm, *_ = (t.to(cuda) if t is not None else t for t in _inputs(T=5, B=8, H=256, dtype=dtype))
    for seed in (1, 2):
        proj, _, _, h0, c0, lens = (t.to(cuda) if t is not None else t
                                    for t in _inputs(T=5, B=8, H=256, dtype=dtype, lengths=True, seed=seed))
        got = graphs.forward(proj, w_hh, w_hm, h0, c0, lens, True, False)
        want = recurrence.forward(proj, w_hh, w_hm, h0, c0, lens, True, False)
        assert all(rel_err(a, b) <= ABS[dtype] for a, b in zip(got, want))
        grads = (torch.randn_like(want[0]), torch.randn_like(want[1]), None)
        got_grads = graphs.backward(*grads, w_hh, w_hm, h0, c0, lens, got[0], got[2], got[3])
        want_grads = recurrence.backward(*grads, w_hh, w_hm, h0, c0, lens, want[0], want[2], want[3])
        assert all(rel_err(a, b) <= ABS[dtype] for a, b in zip(got_grads, want_grads))
    assert graphs._CACHE.captures == 2


@needs_gpu
def test_a_real_step_graph_and_the_graphed_generation(monkeypatch, tmp_path):
    from fastmlstm import ByteLM

    cuda = torch.device("cuda")
    weight = torch.randn(4, 4, device=cuda)
    graph = capture.StepGraph(lambda i, s: ((s[0] @ weight + i["x"],), (s[0] @ weight + i["x"],)),
                              {"x": torch.zeros(2, 4, device=cuda)}, (torch.ones(2, 4, device=cuda),), cuda)
    h = torch.ones(2, 4, device=cuda)
    for _ in range(3):
        x = torch.randn(2, 4, device=cuda)
        out = graph({"x": x})[0]
        h = h @ weight + x
        assert torch.allclose(out, h, rtol=1e-5, atol=1e-5) and torch.allclose(graph.state[0], h, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    verdicts.forget_process_memory()
    torch.manual_seed(0)
    model = ByteLM(hidden_size=128, embed_size=16, device=cuda)
    monkeypatch.setenv(verdicts.ENV_KERNEL, "step")
    eager = model.generate("ab", 12, temperature=0, num_samples=4)
    monkeypatch.setenv(verdicts.ENV_KERNEL, "graph")
    assert model.generate("ab", 12, temperature=0, num_samples=4) == eager
    [stored] = list(tmp_path.rglob("generate-graph-*.json"))
    assert '"status": "passed"' in stored.read_text(), stored.read_text()
    verdicts.forget_process_memory()
