"""Whether a state dict read from a file fits the model its config builds, said in one phrase per
problem (:func:`fastmlstm.models.serialization._build` raises the error naming the file)."""

from __future__ import annotations

import re

import torch

from ..errors import ModelFileError

__all__ = ["load_state_problems", "misfit", "tensor_problems"]

# What a model's tensors may be stored in: what save_pretrained(dtype=...) writes, and float64.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_problems(model, state: dict) -> list[str]:
    """What is wrong with the entries of ``state`` that ``model`` has under the same names: a
    non-tensor, a tensor that is not floating point, not dense or of a dtype no weights are stored
    in (float8), or one of another shape."""
    expected = model.state_dict()
    problems = []
    for name, got in state.items():
        if not isinstance(got, torch.Tensor):
            problems.append(f"{name!r:.80} is a {type(got).__name__}, not a tensor")
        elif not got.is_floating_point():
            problems.append(f"tensor {name!r} holds {str(got.dtype).removeprefix('torch.')}, not floating point")
        elif got.layout != torch.strided:
            problems.append(f"tensor {name!r} is {str(got.layout).removeprefix('torch.')}, not dense")
        elif got.dtype not in WEIGHT_DTYPES:
            problems.append(f"tensor {name!r} holds {str(got.dtype).removeprefix('torch.')}, which model weights "
                            f"are never stored in ({', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)})")
        elif name in expected and got.shape != expected[name].shape:
            problems.append(f"tensor {name!r} has shape {list(got.shape)} where the config needs "
                            f"{list(expected[name].shape)}")
    return problems


def load_state_problems(exc: RuntimeError) -> list[str]:
    """torch's load_state_dict error (keys missing or unexpected after the model's own renames of
    older names, shapes that differ), one short phrase per problem."""
    problems = []
    for line in str(exc).splitlines():
        line = line.strip()
        keys = re.findall(r'"([^"]+)"', line)
        if line.startswith("Missing key(s)"):
            problems.append(f"it lacks the tensor(s) {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        elif line.startswith("Unexpected key(s)"):
            problems.append(f"it holds unexpected tensor(s) {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        elif m := re.match(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                           r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", line):
            problems.append(f"tensor {m[1]!r} has shape {m[2]} where the config needs {m[3]}")
    return problems


def misfit(source: str, config: dict, problems: list[str]) -> ModelFileError:
    described = ", ".join(f"{k}={v!r}" for k, v in config.items())
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return ModelFileError(f"{source} does not fit its config ({described}): {problems[0]}{more}")
