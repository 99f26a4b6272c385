"""The persistent kernels' launch (fastmlstm/ops/triton/persistent/launch.py) without a GPU: the
arguments handed to the Gluon kernels match their parameters and the compile targets the static
report compiles (signature, constexprs, descriptor boxes and layouts), and the error word the
kernels set turns into a RuntimeError naming the step. The launch itself is replaced by a stub."""

import inspect

import pytest
import torch

from fastmlstm.ops.triton.configs import FP_FUSION, Device
from fastmlstm.ops.triton.persistent import gluon_backward, gluon_forward, launch, schedule, targets

HOPPER = Device(132, (9, 0), "NVIDIA H100 80GB HBM3")


class _Stub:
    """Stands in for a Gluon kernel: records the launch, and sets the error word if asked to."""

    def __init__(self, fn, error=0):
        self.fn, self.error, self.calls = fn, error, []

    def __getitem__(self, grid):
        def launch_(**kwargs):
            self.calls.append((grid, kwargs))
            kwargs["p_err"].fill_(self.error)

        return launch_


def _forward_args(T, B, H, dtype=torch.bfloat16, lengths=None):
    # Only shapes matter here: nothing computes (zeros are quick to make at H = 4096).
    return (torch.zeros(T, B, 5 * H, dtype=dtype), torch.zeros(4 * H, H, dtype=dtype), torch.zeros(H, H, dtype=dtype),
            torch.zeros(B, H), torch.zeros(B, H), lengths, True, True)


@pytest.mark.parametrize("design, H, B", [("cluster", 4096, 128), ("stationary", 1024, 64), ("stationary", 2048, 128),
                                          ("cluster", 4096, 1)])
def test_launch_arguments_match_the_kernels_and_the_compile_targets(monkeypatch, design, H, B):
    T = 2
    fwd, bwd = _Stub(gluon_forward.forward_kernel), _Stub(gluon_backward.backward_kernel)
    monkeypatch.setattr(gluon_forward, "forward_kernel", fwd)
    monkeypatch.setattr(gluon_backward, "backward_kernel", bwd)
    args = _forward_args(T, B, H, lengths=torch.full((B,), T, dtype=torch.int64))
    out, c_n, cells, act = launch.forward(design, HOPPER, launch.gpu_forward, *args)
    go = torch.randn(T, B, H).to(torch.bfloat16)
    launch.backward(design, HOPPER, launch.gpu_backward, go, None, None, args[1], args[2], args[3], args[4],
                    args[5], out.nan_to_num(), cells.nan_to_num(), act.nan_to_num())
    for stub, direction in ((fwd, "forward"), (bwd, "backward")):
        (grid, kwargs), = stub.calls
        sched = schedule.plan(design, direction, B, H, 2, HOPPER)
        target = targets.target_for(sched, "bf16")
        params = list(inspect.signature(stub.fn.fn).parameters)
        assert set(kwargs) == set(params) | {"num_warps", "num_ctas", "enable_fp_fusion"}
        assert kwargs["enable_fp_fusion"] is FP_FUSION  # as the ahead-of-time compiles (static_gluon.py) ask
        assert grid == (sched.clusters,) and kwargs["num_ctas"] == target.num_ctas
        assert kwargs["num_warps"] == target.num_warps
        assert set(target.signature) | set(target.constexprs) == set(params)
        for name in target.constexprs:
            if name not in ("SAVE", "HAS_LEN", "HAS_DOUT", "HAS_DCELLS"):  # runtime flags: the call's own
                assert kwargs[name] == target.constexprs[name], name
        for name, kind in target.signature.items():
            if kind.startswith("tensordesc"):
                desc = kwargs[name]
                assert kind == f"tensordesc<bf16[{','.join(map(str, desc.block_shape))}],{desc.layout!r}>", name
            elif kind.startswith("*"):
                assert isinstance(kwargs[name], torch.Tensor), name
        table = kwargs["p_table"]
        assert table.shape == (2, sched.clusters, sched.max_items(), len(schedule.ITEM_FIELDS))
        assert kwargs["p_sync"].numel() == 2 * T + (direction == "backward")
        assert kwargs["p_ws"].numel() >= sched.slots * B * sched.cluster * sched.block_m
    assert fwd.calls[0][1]["HAS_LEN"] and not bwd.calls[0][1]["HAS_DCELLS"]


@pytest.mark.parametrize("direction", schedule.DIRECTIONS)
def test_a_failed_wait_raises_naming_the_step(monkeypatch, direction):
    T, B, H = 3, 4, 64  # error word 4: phase instance 3, the second phase of the second step walked
    monkeypatch.setattr(gluon_forward, "forward_kernel", _Stub(None, error=4))
    monkeypatch.setattr(gluon_backward, "backward_kernel", _Stub(None, error=4))
    args = _forward_args(T, B, H)
    if direction == "forward":
        with pytest.raises(RuntimeError, match=r"step 1, phase z .*FASTMLSTM_KERNEL=step"):
            launch.forward("cluster", HOPPER, launch.gpu_forward, *args)
    else:
        grads = (torch.randn(T, B, H).to(torch.bfloat16), None, None, args[1], args[2], args[3], args[4], None,
                 torch.zeros(T, B, H, dtype=torch.bfloat16), torch.zeros(T, B, H), torch.zeros(T, B, 6 * H,
                                                                                          dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match=r"\(backward\): a wait at step 1, phase dm "):
            launch.backward("cluster", HOPPER, launch.gpu_backward, *grads)


def test_inapplicable_design_is_a_clear_error():
    with pytest.raises(ValueError, match="stationary kernel does not apply.*fit neither on chip nor"):
        launch.forward("stationary", HOPPER, launch.gpu_forward, *_forward_args(1, 2, 4096))


def test_compile_targets_cover_the_dispatchable_configurations():
    found = targets.compile_targets("bf16")
    assert targets.compile_targets("fp32") == []
    names = {t.name for t in found}
    assert len(names) == len(found)
    for device in targets.DEVICES:
        for H, B in targets.MODEL_SHAPES:
            for design in schedule.DESIGNS:
                for direction in schedule.DIRECTIONS:
                    sched = schedule.plan(design, direction, B, H, 2, device)
                    if sched is not None:
                        assert targets.target_for(sched, "bf16").name in names
    for t in found:
        assert t.num_ctas == t.schedule.cluster and t.cluster_dims == (t.num_ctas, 1, 1) and t.arch == 90
        base = {"wgmma", "cp.async.bulk.tensor", "multicast::cluster", "barrier.cluster"}
        # A stationary schedule that streams part of its weights keeps them in L2 (an eviction policy).
        keeps = t.schedule.design == "stationary" and t.schedule.streams
        assert set(t.expected_ptx) == base | ({"L2::cache_hint"} if keeps else set())
        assert t.constexprs["ROWS"] == t.schedule.block_m == (64 if t.schedule.design == "stationary" else 256)
        assert t.signature["p_proj" if t.schedule.direction == "forward" else "p_dproj"] == "*bf16"
