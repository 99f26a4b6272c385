"""Every numeric option, checked in one place (fastmlstm/options.py): NaN, inf and out-of-range values
are one line and exit status 2 on every command's every numeric flag (found by walking the argparse
parsers, so a new flag is covered without editing this file), and the same values raise InputError
from the Python API."""

import argparse
import math
from argparse import Namespace

import numpy as np
import pytest
import torch

import fastmlstm
from fastmlstm import cli
from fastmlstm.errors import InputError, InputTypeError
from fastmlstm.options import OPTIONS, Number, argument, check
from fastmlstm.training import config, update


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _subparsers(cli.build_parser())


def _numeric_flags():
    """(command, flag, action) of every option whose value is a number, on every command."""
    found = []
    for command, parser in COMMANDS.items():
        for action in parser._actions:
            if action.option_strings and (hasattr(action.type, "option") or action.type in (int, float)):
                found.append((command, action.option_strings[0], action))
    return found


NUMERIC_FLAGS = _numeric_flags()


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """A command line holding only the command's required arguments, each with a placeholder value."""
    argv = []
    for action in parser._actions:
        if action.required:
            value = str(next(iter(action.choices))) if action.choices else "x"
            argv += [value] if not action.option_strings else [action.option_strings[0], value]
    return argv


def _bad_values(action) -> list[str]:
    """NaN, infinities and, where the option has a lower bound, values below it (zero and negative
    numbers where they mean nothing); for an integer option also a fraction."""
    spec = OPTIONS[action.type.option]
    values = ["nan", "NaN", "inf", "-inf", "1e999"]
    if spec.low is not None:
        values += [str(spec.low - 1 if spec.kind is int else spec.low - 0.5)]
        if spec.low_open:
            values.append(str(spec.low))
    if spec.high is not None:
        values.append(str(spec.high + 1))
    if spec.kind is int:
        values.append("1.5")
    return values


def test_the_parsers_have_numeric_flags_on_every_command_that_takes_numbers():
    commands = {command for command, _, _ in NUMERIC_FLAGS}
    assert {"train", "featurize", "probe", "visualize", "generate", "download"} <= commands
    assert len(NUMERIC_FLAGS) >= 29  # 13 train, 7 generate, 4 probe, 3 visualize, featurize, download


@pytest.mark.parametrize("command, flag, action", NUMERIC_FLAGS, ids=[f"{c} {f}" for c, f, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_refuses_nan_inf_and_out_of_range_in_one_line(command, flag, action, capsys):
    if action.type in (int, float):
        # A bare int/float accepts NaN (float) or any sign (int): only a closed list of choices may use it.
        assert action.choices, f"{command} {flag} takes a number without a range: use fastmlstm.options.argument"
        return
    base = [command, *_required(COMMANDS[command])]
    for value in _bad_values(action):
        assert cli.main([*base, f"{flag}={value}"]) == 2, (flag, value)  # '=': argparse reads "-inf" as a flag
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"fastmlstm {command}: error: argument {flag}"), err
        assert repr(value) in err and "must be" in err, err


def test_the_training_scripts_parser_refuses_them_too(capsys):
    from fastmlstm.training import main

    for flag, value in (("--lr", "nan"), ("--clip", "nan"), ("--clip", "-inf"), ("--steps", "0"), ("--keep", "inf")):
        assert main(["--data", "x", "--out", "y", f"{flag}={value}"], prog="train.py") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"train.py: error: argument {flag}: must be") and err.count("\n") == 1, err


def test_good_values_pass_and_are_numbers():
    parser = COMMANDS["generate"]
    args = parser.parse_args(["--model", "m", "--temperature", "0", "--top-k", "256", "--n-bytes", "0",
                              "--seed", str(2**31 - 1), "--fix", "7=-2.5"])
    assert (args.temperature, args.top_k, args.n_bytes, args.seed, args.fix) == (0.0, 256, 0, 2**31 - 1,
                                                                                 [(7, -2.5)])
    args = config.parse_args(["--data", "x", "--out", "y", "--clip", "0", "--eval-every", "0", "--lr", "1e-3"])
    assert args.clip == 0.0 and args.eval_every == 0 and args.lr == 1e-3


@pytest.mark.parametrize("fix, match", [
    ("3=nan", "VALUE must be a finite number, got 'nan'"),
    ("3=-inf", "VALUE must be a finite number"),
    ("-1=1", "UNIT must be an integer >= 0, got '-1'"),
    ("x=1", "UNIT must be an integer >= 0"),
    ("3", "takes UNIT=VALUE"),
])
def test_fix_values_are_checked_like_the_other_numbers(fix, match, capsys):
    assert cli.main(["generate", "--model", "m", f"--fix={fix}"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("fastmlstm generate: error: argument --fix") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# The table itself


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_refuses_nan_inf_and_values_outside_its_range(name):
    spec = OPTIONS[name]
    bad = [float("nan"), float("inf"), -float("inf")] if spec.kind is float else [1.5, float("nan"), "3", True]
    if spec.low is not None:
        bad.append(spec.low - 1)
    if spec.high is not None:
        bad.append(spec.high + 1)
    for value in bad:
        with pytest.raises(InputError, match=f"^{name} must be"):
            check(name, value)
    if not spec.optional:
        with pytest.raises(InputTypeError, match=f"^{name} must be"):
            check(name, None)
    good = spec.low if spec.low is not None and not spec.low_open else (spec.low or 0) + 1
    assert check(name, good) == good and type(check(name, good)) is spec.kind
    assert argument(name)(str(good)) == good


def test_numbers_of_other_types_are_converted():
    assert check("n_bytes", np.int64(5)) == 5 and type(check("n_bytes", np.int64(5))) is int
    assert check("n_bytes", torch.tensor(5)) == 5
    assert check("temperature", np.float32(0.5)) == 0.5 and type(check("temperature", 1)) is float
    assert check("temperature", torch.tensor(0.25)) == 0.25
    with pytest.raises(InputTypeError):
        check("n_bytes", 5.0)  # a count is an integer, not a float that happens to be whole
    with pytest.raises(InputTypeError):
        check("temperature", torch.ones(2))
    for flag in (torch.tensor(True), np.bool_(True), np.array(False)):  # (index() reads them as 1 and 0)
        for name in ("n_bytes", "temperature"):
            with pytest.raises(InputTypeError, match=f"^{name} must be"):
                check(name, flag)


def test_descriptions():
    assert Number(int, 1).describe() == "an integer >= 1"
    assert Number(float, 0, low_open=True).describe() == "a finite number > 0"
    assert Number(int, 1, 256).describe() == "an integer in [1, 256]"
    assert Number(float, 0, 1, high_open=True).describe() == "a finite number in [0, 1)"
    assert Number(float).describe() == "a finite number"


# ------------------------------------------------------------------------------------------------
# The Python API


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastmlstm.ByteLM(hidden_size=8, embed_size=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
    ({"n_bytes": -1}, "n_bytes must be an integer >= 0, got -1"),
    ({"n_bytes": 2.5}, "n_bytes must be an integer >= 0, got 2.5"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
    ({"top_k": 0}, r"top_k must be an integer in \[1, 256\], got 0"),
    ({"top_k": 257}, r"top_k must be an integer in \[1, 256\], got 257"),
    ({"seed": -1}, "seed must be an integer in"),
    ({"fixed_units": {0: math.nan}}, r"fixed_units\[0\] must be a finite number, got nan"),
    ({"fixed_units": {0: -math.inf}}, r"fixed_units\[0\] must be a finite number, got -inf"),
    ({"fixed_units": {-1: 1.0}}, "a unit of fixed_units must be an integer >= 0, got -1"),
    ({"fixed_units": {8: 1.0}}, r"fixed_units must name units in \[0, 8\)"),
])
def test_generate_checks_its_numbers(model, kwargs, match):
    with pytest.raises(InputError, match=match):
        model.generate("a", **{"n_bytes": 2, **kwargs})


def test_steer_and_featurize_check_their_numbers(model):
    from fastmlstm.probe import cell_trace, featurize, steer

    with pytest.raises(InputError, match=r"values\['up'\] must be a finite number, got nan"):
        steer(model, 1, {"up": math.nan}, n_bytes=2)
    with pytest.raises(InputError, match="unit must be an integer >= 0, got -3"):
        steer(model, -3, n_bytes=2)
    with pytest.raises(InputError, match="temperature must be"):
        steer(model, 1, n_bytes=2, temperature=math.nan)
    for kwargs in ({"batch_size": 0}, {"batch_size": math.nan}, {"chunk_size": 0}, {"chunk_size": 1.5}):
        with pytest.raises(InputError, match=f"{next(iter(kwargs))} must be an integer >= 1"):
            featurize(model, ["a"], **kwargs)
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1"):
        cell_trace(model, "a", chunk_size=-1)


def test_training_checks_a_namespace_built_in_python(tmp_path):
    from fastmlstm.training import train
    from fastmlstm.training.distributed import init_context

    good = config.parse_args(["--data", "x", "--out", str(tmp_path / "run"), "--preset", "tiny"])
    for key, value in (("lr", math.nan), ("clip", math.nan), ("clip", math.inf), ("steps", 0), ("batch", 2.5),
                       ("seed", -1), ("eval_every", -1)):
        args = Namespace(**{**vars(good), key: value})
        with pytest.raises(InputError, match=f"--{key.replace('_', '-')} must be"):
            train(args, init_context())
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_nan_clip_never_turns_clipping_off():
    # The last line of defence: the update itself refuses what would make `clip > 0` false.
    with pytest.raises(InputError, match="clip must be a finite number >= 0, got nan"):
        update.train_step(None, None, None, None, False, 1e-3, None, math.nan)


def test_evaluate_and_visualize_check_their_numbers(model, tmp_path):
    from fastmlstm.probe import evaluate, visualize_text

    for kwargs, match in (({"limit": math.nan}, "limit must be an integer >= 2"),
                          ({"seed": -1}, r"seed must be an integer in \[0, 2147483647\]"),
                          ({"curve_draws": 0}, "curve_draws must be an integer >= 1"),
                          ({"batch_size": 0}, "batch_size must be an integer >= 1")):
        with pytest.raises(InputError, match=match):  # before any data is read
            evaluate(model, "sst2", root=tmp_path / "none", **kwargs)
    for kwargs, match in (({"scale": math.nan}, "scale must be a finite number > 0"),
                          ({"scale": 0}, "scale must be a finite number > 0"),
                          ({"width": 0}, "width must be an integer >= 1")):
        with pytest.raises(InputError, match=match):
            visualize_text(model, "good", 1, html_path=tmp_path / "v.html", **kwargs)
    assert not (tmp_path / "v.html").exists()
