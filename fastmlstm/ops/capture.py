"""CUDA graphs for loops bound by the host's launches, behind one interface with a CPU stand-in.

A recurrence step at H = 1024 is two kernel launches of a few microseconds of GPU time each, while
the host needs more than that to launch each one (bench/kernels/costmodel.py's cpu_launch_us): the
GPU waits on the host. A CUDA graph records the launches once and replays them all with one.

- :func:`capture` records ``fn()`` as a graph on a CUDA device and returns ``(replay, outputs)``:
  each ``replay()`` reruns the recorded work on whatever the static input buffers hold and leaves
  the results in ``outputs``. On any other device the stand-in returns the same pair, with a
  ``replay`` that runs ``fn()`` and copies its results into ``outputs``, so the host side (buffers,
  copies, caching) runs and is tested on a CPU exactly as on a GPU.
- :class:`StaticInputs`: the buffers a graph reads; ``load`` copies new values in, skipping a tensor
  that is the same, unchanged tensor as the last one loaded (a weight between calls).
- :class:`GraphCache`: captured graphs by key, least recently used first out, bounded in count and
  in the bytes their static buffers hold.
- :class:`StepGraph`: one step of a stateful loop (a generation step) as a graph whose state stays
  in its static buffers from one replay to the next.

Example::

    >>> x = torch.zeros(3)
    >>> replay, out = capture(lambda: x * 2, torch.device("cpu"))
    >>> x += 1; replay(); out
    tensor([2., 2., 2.])
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphCache", "StaticInputs", "StepGraph", "capture", "capturing", "nbytes"]


def capturing(device: torch.device) -> bool:
    """Whether work on ``device``'s current stream is being recorded into a graph right now (then
    nothing may capture or synchronise, only launch)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capture(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any]:
    """Record ``fn()`` (on ``device``) once; returns ``(replay, outputs)``. ``fn`` must read its
    inputs from buffers that outlive the graph and return tensors (nested in tuples/lists, None
    allowed): replays rewrite exactly those tensors. Nothing is computed until the first replay."""
    if device.type == "cuda":
        return _cuda_capture(fn, device)
    return _stand_in(fn)


def _cuda_capture(fn, device):
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    # One run outside the capture: kernels compile and libraries set up their workspaces here,
    # none of which may happen while a stream is being recorded.
    with torch.cuda.stream(side):
        fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


def _stand_in(fn):
    outputs = fn()

    def replay():
        _copy_into(outputs, fn())

    return replay, outputs


def _copy_into(dst, src) -> None:
    if isinstance(dst, Tensor):
        if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            raise RuntimeError("a replay produced outputs of another shape or dtype than the capture")
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        if not isinstance(src, (tuple, list)) or len(src) != len(dst):
            raise RuntimeError("a replay produced another structure of outputs than the capture")
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif dst is not None or src is not None:
        raise RuntimeError("a replay produced another structure of outputs than the capture")


def nbytes(*values) -> int:
    """Bytes held by the tensors in ``values`` (nested in tuples, lists and mappings)."""
    total = 0
    for value in values:
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            total += nbytes(*value)
        elif isinstance(value, Mapping):
            total += nbytes(*value.values())
    return total


def _signature(t: Tensor) -> tuple:
    return t._version, t.data_ptr(), t.dtype, t.shape, t.stride()


class StaticInputs:
    """Buffers a graph reads, one per named input (None stays None), filled by :meth:`load`.

    A tensor loaded twice in a row that is the same object with the same version counter (no
    in-place update PyTorch tracks happened in between) is not copied again: weights stay put
    between the calls of an inference loop.
    """

    def __init__(self, values: Mapping[str, Tensor | None]):
        self.buffers = {k: None if v is None else torch.empty_like(v, memory_format=torch.contiguous_format)
                        for k, v in values.items()}
        self._last: dict[str, tuple[weakref.ref, tuple]] = {}
        self.copies = 0  # tensors copied in so far (tests read it)

    def load(self, values: Mapping[str, Tensor | None]) -> None:
        for name, value in values.items():
            buffer = self.buffers[name]
            if value is None or buffer is None:
                if (value is None) != (buffer is None):
                    raise ValueError(f"input {name!r} is None in one call and a tensor in another")
                continue
            last = self._last.get(name)
            signature = _signature(value)
            if last is not None and last[0]() is value and last[1] == signature:
                continue
            buffer.copy_(value)
            self.copies += 1
            self._last[name] = (weakref.ref(value), signature)


class GraphCache:
    """Captured graphs by key, at most ``max_entries`` of them holding at most ``max_bytes`` of
    static buffers together; the least recently used go first. Thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self.lock = threading.RLock()
        self.captures = 0  # graphs kept since the last clear() (tests read it)

    def get(self, key) -> Any | None:
        with self.lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key, entry: Any, size: int) -> bool:
        """Keep ``entry`` (of ``size`` bytes); False, keeping nothing, when it alone is too big."""
        with self.lock:
            if size > self.max_bytes:
                return False
            self._entries.pop(key, None)
            self._entries[key] = (entry, size)
            self.captures += 1
            while len(self._entries) > self.max_entries or self.held_bytes() > self.max_bytes:
                self._entries.popitem(last=False)
            return True

    def held_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self.captures = 0


class StepGraph:
    """One step of a loop whose state lives on the device, as a graph.

    ``step(inputs, state) -> (outputs, new_state)`` with ``inputs`` a dict of tensors and ``state``
    a tuple. The graph reads the inputs from static buffers and its state from static state
    buffers, and writes the new state back into them, so a replay advances the loop by one step
    with one launch (plus the copies of the new inputs). ``outputs`` are returned as clones.
    """

    def __init__(self, step: Callable, inputs: Mapping[str, Tensor], state: tuple[Tensor, ...],
                 device: torch.device):
        self.inputs = StaticInputs(inputs)
        self.inputs.load(inputs)
        self.state = tuple(s.detach().clone() for s in state)

        def body():
            outputs, new_state = step(self.inputs.buffers, self.state)
            for static, new in zip(self.state, new_state):
                static.copy_(new)
            return outputs

        self._replay, self._outputs = capture(body, device)
        self.load_state(state)  # capturing may have run the step once (the warm-up, the stand-in)

    def load_state(self, state: tuple[Tensor, ...]) -> None:
        for static, value in zip(self.state, state):
            static.copy_(value)

    def __call__(self, inputs: Mapping[str, Tensor]):
        self.inputs.load(inputs)
        self._replay()
        return _clone(self._outputs)


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value
