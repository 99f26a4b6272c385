"""The per-byte step of :meth:`ByteLM.generate <fastmlstm.models.lm.ByteLM.generate>`: run eagerly,
or, on a GPU once checked, replayed as one CUDA graph; and the recurrence it advances
(:func:`byte_advance`).

A generation step (embedding gather, the recurrence's two kernels, the held units, the readout) is
a handful of small launches; at H = 1024 and 64 samples the host needs longer to launch them than
the GPU to run them. :class:`ByteStepper` runs the first step eagerly (every kernel compiles and
every dispatch decision is made there), then, where allowed, captures the step as a
:class:`fastmlstm.ops.capture.StepGraph` whose state stays on the device between bytes.

The graph is a candidate like the recurrence's (:mod:`fastmlstm.ops.verdicts`): on first use for a
key (device, driver, versions, sources, dtype, backend, H, B rounded up to a power of two, whether
units are held) it is compared with the eager step over :data:`CHECK_STEPS` bytes (logits and both
states may differ by at most ``verdicts.ABS[dtype]``, relative: the same kernels replayed, since a
capture takes the tested path of every backend and so does the eager step it is compared with) and
both are timed (the eager step as it would run); it is used only if it passed and is faster.
``FASTMLSTM_KERNEL=graph`` forces it (with a warning if it failed), ``step`` or ``persistent`` keep
the eager step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..errors import InputError
from ..nn.functional import multiplicative_lstm_recurrence
from ..ops import capture, resolve_backend, verdicts

__all__ = ["ByteStepper", "byte_advance", "byte_probabilities", "sample_bytes"]

CHECK_STEPS = 3
TIMING_STEPS = 16


def byte_advance(table: Tensor, weight_hh: Tensor, weight_hm: Tensor, backend: str, B: int,
                 held: tuple[Tensor, Tensor] | None = None) -> Callable:
    """``advance(bytes [T, B] long, state or None) -> (last output [B, H], (h, c))``: the recurrence
    over bytes whose input projections are rows of ``table`` [256, 5H], with the cell units
    ``held = (units, values)`` set after every step.

    One byte from a state goes through the backend's prepared step where it has one (the CPU's: the
    packed weights bound once per call of ``generate``), without the functional recurrence's checks
    and lookups, which were most of a byte's time at small sizes; the result is the same
    (``tests/models/test_generation.py``). Anything else takes
    :func:`~fastmlstm.nn.functional.multiplicative_lstm_recurrence`.
    """
    step = ops.prepare_sequence_step(resolve_backend(backend, table.device, table.dtype), weight_hh, weight_hm, B)

    def advance(byte_rows: Tensor, state):
        proj = F.embedding(byte_rows, table)
        if step is not None and state is not None and byte_rows.shape[0] == 1:
            out, c = step(proj, state[0], state[1])
            h = out[0].float()  # (the state is float32; for float32 weights this is out[0] itself)
        else:
            out, (h, c) = multiplicative_lstm_recurrence(proj, weight_hh, weight_hm, initial_state=state,
                                                         backend=backend)
        if held is not None:
            c[:, held[0]] = held[1]
        return out[-1], (h, c)

    return advance


def byte_probabilities(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """``softmax(logits / temperature)`` [B, 256] over the ``top_k`` most likely bytes of each row if
    given (the others get probability 0; bytes tied with the k-th are kept, so a tie can let more
    than k through, as the usual top-k filters do); temperature > 0."""
    scores = logits / temperature
    if top_k is not None:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1)


def sample_bytes(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None,
                 ) -> Tensor:
    """One byte per row of ``logits`` [B, 256]: the most likely one at temperature 0, else a draw from
    :func:`byte_probabilities`.

    The draw is the one ``torch.multinomial`` makes for one sample, ``argmax(p / E)`` with E ~ Exp(1)
    drawn from ``generator`` (the exponential race: row i wins with probability p_i), without its
    input checks, several operators that took about a third of a byte's time at small sizes. The
    one check that matters here is kept: logits that are NaN or +inf (weights or a state that
    overflowed) raise ``FloatingPointError`` instead of giving bytes; a -inf logit is a byte of
    probability 0, as in ``torch.multinomial``.
    """
    if temperature == 0:
        best = logits.argmax(dim=-1)  # (argmax picks a NaN or +inf where a row holds one)
        if not bool(torch.isfinite(logits.gather(1, best.unsqueeze(1))).all()):
            raise _not_finite()
        return best
    p = byte_probabilities(logits, temperature, top_k)
    if torch.isnan(p).any():  # (softmax gives NaN for NaN or +inf scores)
        if bool(torch.isfinite(logits).all()):
            raise InputError(f"temperature {temperature!r} is too small for these logits: logits / temperature "
                             "overflows float32; use temperature=0 for the most likely byte")
        raise _not_finite()
    return (p / torch.empty_like(p).exponential_(generator=generator)).argmax(dim=-1)


def _not_finite() -> FloatingPointError:
    return FloatingPointError("the model's next-byte logits are not finite (NaN or inf): the weights or the "
                              "state overflowed, and nothing can be sampled from them")


class ByteStepper:
    """``stepper(byte [B] long) -> logits [B, 256] float32``, advancing the state it holds.

    Args:
        advance: ``advance(bytes [1, B], state) -> (last output [B, H], state)``, the eager step.
        readout: ``readout(last output) -> logits``.
        state: the state after the prefix, ``(h, c)``.
        describe: what the step is, for the verdict's key: dtype, H, B, backend, steered.

    Example::

        >>> stepper = ByteStepper(lambda b, s: (s[0] + b.T.float(), s), lambda h: h * 2,
        ...                       (torch.zeros(2, 1), torch.zeros(2, 1)), {"dtype": torch.float32})
        >>> stepper(torch.tensor([1, 2])).flatten().tolist()
        [2.0, 4.0]
    """

    def __init__(self, advance: Callable, readout: Callable, state: tuple[Tensor, Tensor], describe: dict):
        self.advance, self.readout, self.state = advance, readout, state
        self.describe = describe
        self.device = state[0].device
        self.graph: capture.StepGraph | None = None
        self._decided = not self._may_graph()

    def _may_graph(self) -> bool:
        return (self.device.type == "cuda" and self.describe["dtype"] in verdicts.ABS
                and not torch.is_autocast_enabled(self.device.type)
                and verdicts.kernel_choice() in ("auto", "graph"))

    def _eager(self, byte: Tensor) -> Tensor:
        last, self.state = self.advance(byte.unsqueeze(0), self.state)
        return self.readout(last)

    def _graph_step(self, inputs: dict, state: tuple):
        last, new_state = self.advance(inputs["byte"].unsqueeze(0), state)
        return (self.readout(last),), new_state

    def _build(self, byte: Tensor, state: tuple) -> capture.StepGraph:
        return capture.StepGraph(self._graph_step, {"byte": byte}, state, self.device)

    def __call__(self, byte: Tensor) -> Tensor:
        if self.graph is not None:
            return self.graph({"byte": byte})[0]
        logits = self._eager(byte)
        if not self._decided:
            self._decided = True
            self.graph = self._decide(byte)
            if self.graph is not None:
                self.graph.load_state(self.state)
        return logits

    def _decide(self, byte: Tensor) -> capture.StepGraph | None:
        site = verdicts.site_of(self.device)
        if site is None or capture.capturing(self.device):
            return None
        forced = verdicts.kernel_choice() == "graph"
        built: list = []
        verdict = verdicts.decide(self._key(site), lambda: self._check(byte, built))
        where = f"{_case(self.describe)} on {site.name}"
        if verdict is None:  # another process is checking it right now
            return self._build(byte, self.state) if forced else None
        if not verdict.passed:
            note = "runs anyway (FASTMLSTM_KERNEL=graph)" if forced else "the eager step runs instead"
            verdicts.log_once(f"fastmlstm: the CUDA-graphed generation step failed its check for {where}: "
                              f"{verdict.reason}; {note}", logging.WARNING)
            if not forced:
                return None
        elif not verdict.faster("step") and not forced:
            verdicts.log_once(f"fastmlstm: the CUDA-graphed generation step is not faster for {where} "
                              f"({verdict.speedup('step'):.2f}x the eager step's speed); the eager step runs")
            return None
        else:
            verdicts.log_once(f"fastmlstm: generation steps run as one CUDA graph for {where} "
                              f"({verdict.speedup('step'):.2f}x the eager step's speed)")
        return built[0] if built else self._build(byte, self.state)

    def _key(self, site: verdicts.Site) -> dict:
        here = Path(__file__).parent
        d = self.describe
        dtype = str(d["dtype"]).replace("torch.", "")
        sources = (here, here.parent / "ops", here.parent / "ops" / "triton", here.parent / "nn")
        return {**site.identity(), **verdicts.software(), "candidate": "generate-graph",
                "source": verdicts.source_hash(*map(str, sources)), "dtype": dtype,
                "backend": resolve_backend(d["backend"], self.device, d["dtype"]), "H": d["H"],
                "B_class": _b_class(d["B"]), "steered": bool(d["steered"]),
                "case": f"{dtype}-H{d['H']}-B{_b_class(d['B'])}" + ("-steered" if d["steered"] else "")}

    def _check(self, byte: Tensor, built: list) -> verdicts.Verdict:
        """The graph against the eager step from the same state over a few bytes, then both timed."""
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            graph = self._build(byte, self.state)
            state = tuple(s.clone() for s in self.state)
            errors, tol = {}, verdicts.ABS[self.describe["dtype"]]
            for k in range(CHECK_STEPS):
                b = (byte + 7 * k) % 256
                got = graph({"byte": b})[0]
                with verdicts.tested_path():  # the kernels the capture recorded
                    last, state = self.advance(b.unsqueeze(0), state)
                    want = self.readout(last)
                pairs = {"logits": (got, want), "h": (graph.state[0], state[0]),
                         "c": (graph.state[1], state[1])}
                for name, (a, want) in pairs.items():
                    errors[f"step {k} {name}"] = err = verdicts.rel_err(a, want)
                    if not err <= tol:
                        return verdicts.Verdict("failed", f"step {k}: {name} differs from the eager step by {err:.2e} "
                                                f"> {tol:g}", errors=errors)
            eager_state = [tuple(s.clone() for s in self.state)]

            def eager():
                for _ in range(TIMING_STEPS):
                    last, eager_state[0] = self.advance(byte.unsqueeze(0), eager_state[0])
                    self.readout(last)

            def replay():
                for _ in range(TIMING_STEPS):
                    graph({"byte": byte})

            step_ms, graph_ms = (ms / TIMING_STEPS for ms in verdicts.compare_ms(eager, replay, self.device))
        built.append(graph)
        return verdicts.Verdict("passed", errors=errors, step_ms={"step": step_ms}, candidate_ms={"step": graph_ms},
                                checked=dict(self.describe, dtype=str(self.describe["dtype"])))


def _b_class(B: int) -> int:
    return 1 << max(0, (B - 1).bit_length())


def _case(d: dict) -> str:
    return f"{str(d['dtype']).replace('torch.', '')} H={d['H']} B<={_b_class(d['B'])}"
