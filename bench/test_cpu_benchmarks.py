"""pytest-benchmark cases for what a CPU can measure: ``pytest bench/ --benchmark-only``.

The same implementations and case builders as bench/run.py (bench/registry.py, impls.py, gate.py) at one small shape,
every mode; each multiplicative-LSTM implementation must pass the correctness gate first, or its
benchmarks fail instead of reporting a time. On a CUDA machine use bench/run.py, which times with
CUDA events.

    pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds

Like ``bench/run.py --preset cpu`` it runs torch on one thread (``BENCH_THREADS`` to change it):
on a machine whose cores are shared, two threads waiting on each other make the spread explode.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gate  # noqa: E402
import impls  # noqa: E402
import registry  # noqa: E402
import workload  # noqa: E402

DEVICE = torch.device("cpu")
H, B, T, I = 128, 8, 32, 64
N_TEXTS = 32
IMPLS = ("fastmlstm-cpu", "fastmlstm-cpu-forward", "fastmlstm-reference", "mlstm-eager", "mlstm-compile", "nn-lstm",
         "nn-lstm-matched")
CTX = {"compile_backend": "inductor"}


@pytest.fixture(scope="session")
def ctx():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    texts, _ = workload.load_texts(N_TEXTS)
    yield {**CTX, "texts": texts}
    torch.set_num_threads(threads)


_GATE: dict = {}


def _gate(impl: impls.Impl, dtype: str, ctx: dict) -> dict:
    key = (impl.name, dtype)
    if key not in _GATE:
        _GATE[key] = gate.check(impl, registry.DTYPES[dtype], DEVICE, ctx)
    return _GATE[key]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", registry.MODES)
@pytest.mark.parametrize("name", IMPLS)
def test_cpu(benchmark, name, mode, dtype, ctx):
    impl = impls.IMPLS[impls.ALIASES.get(name, name)]
    if mode not in impl.modes:
        pytest.skip(f"{name} has no {mode} case")
    ok, why = impl.status(DEVICE)
    if not ok:
        pytest.skip(why)
    if impl.family == "mlstm":
        result = _gate(impl, dtype, ctx)
        if not result["passed"]:
            pytest.fail(f"{name} {dtype} failed the correctness gate, not benchmarked: "
                        f"{result.get('error') or result['errors']}")
    case = registry.Case(mode, dtype, H, B, 1 if mode == "step" else T, I)
    built = impl.build(case, DEVICE, ctx)
    try:
        built.call()  # compilation and lazy initialization stay out of the rounds
    except RuntimeError as exc:
        if impl.family == "lstm" and "primitive descriptor" in str(exc):
            # oneDNN's LSTM has no bf16 training primitive without AVX-512 BF16 (seen on an AVX2 EPYC).
            pytest.skip(f"{name} cannot run {mode} {dtype} on this CPU: {str(exc).splitlines()[0]}")
        raise
    benchmark.group = f"{mode} {dtype} H={H} B={B}" + ("" if mode in ("step", "featurize") else f" T={T}")
    benchmark.extra_info.update(impl=impl.label(DEVICE), chars=built.chars, hidden_size=built.hidden_size,
                                threads=torch.get_num_threads())
    benchmark.pedantic(built.call, rounds=10, warmup_rounds=2, iterations=1)
