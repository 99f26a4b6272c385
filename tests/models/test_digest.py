"""The content digest that model files and checkpoints carry: a property of what a record holds
(every tensor's dtype, shape and bytes, every plain value), not of how it was pickled or stored,
and changed by any change of it."""

import io

import pytest
import torch

from fastmlstm.models._digest import digest, digest_problem, seal


def _record():
    g = torch.Generator().manual_seed(0)
    return {"format": "fastmlstm.train", "step": 7, "lr": 5e-4, "flag": True, "none": None, "name": "run",
            "state": {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
                      "n": torch.tensor(3)},
            "optimizer": {"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
            "rows": [1, 2, 3], "raw": b"\x00\xff"}


def _round_trip(record):
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_sealed_record_checks_after_a_round_trip_and_the_check_is_of_its_content():
    sealed = seal(_record())
    assert sealed["digest"].startswith("sha256:") and len(sealed["digest"]) == 7 + 64
    back = _round_trip(sealed)
    assert digest_problem(back) is None and digest(back) == sealed["digest"]
    # Neither the dict order nor the memory layout of a tensor is content.
    reordered = dict(reversed(list(back.items())))
    reordered["state"] = {"w": back["state"]["w"].t().contiguous().t(), **back["state"]}
    reordered["optimizer"]["param_groups"][0]["betas"] = [0.9, 0.999]  # a tuple read back as a list elsewhere
    assert digest_problem(reordered) is None
    assert digest_problem(_record()) is None  # nothing to check without a digest


@pytest.mark.parametrize("change", [
    lambda r: r["state"]["w"].view(-1)[11].mul_(1 + 2**-20),  # a few ulps of one float32
    lambda r: r["state"]["b"].view(torch.int16).view(-1)[0].bitwise_xor_(1),  # one bit of a bfloat16
    lambda r: r["state"].update(w=r["state"]["w"].reshape(5, 6)),  # same bytes, another shape
    lambda r: r["state"].update(n=r["state"]["n"].to(torch.int32)),  # same value, another dtype
    lambda r: r.update(step=8),
    lambda r: r.update(lr=5.000000001e-4),
    lambda r: r.update(flag=1),  # True and 1 are different values in a record
    lambda r: r["optimizer"]["state"].update({1: r["optimizer"]["state"].pop(0)}),
    lambda r: r.update(raw=b"\x00\xfe"),
], ids=["float", "bfloat16-bit", "shape", "dtype", "int", "float-value", "bool-vs-int", "key", "bytes"])
def test_any_change_of_the_content_is_caught(change):
    sealed = seal(_record())
    change(sealed)
    problem = digest_problem(sealed)
    assert problem is not None and "the file is damaged" in problem and "SHA-256" in problem, problem


def test_a_digest_from_elsewhere_is_named():
    assert "not a SHA-256 digest" in digest_problem({**_record(), "digest": "md5:0123"})
    assert "not a SHA-256 digest" in digest_problem({**_record(), "digest": 12})


def test_meta_tensors_have_no_content_to_check():
    """``fastmlstm.load(path, map_location="meta")`` reads shapes only: nothing to check, no error."""
    sealed = seal(_record())
    on_meta = {**sealed, "state": {k: v.to("meta") for k, v in sealed["state"].items()}}
    assert digest_problem(on_meta) is None
    assert "digest" not in seal({"w": torch.empty(3, device="meta")})  # nothing to seal either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_tensor_digests_like_its_cpu_copy():
    record = _record()
    on_gpu = {**record, "state": {k: v.cuda() for k, v in record["state"].items()}}
    assert digest(on_gpu) == digest(record)
