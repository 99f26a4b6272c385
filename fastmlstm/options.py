"""Every numeric option of fastmlstm, checked in one place for the command line and the Python API.

An option is a :class:`Number`: integer or real, its range, and whether ``None`` (the default
behaviour) is accepted. A real is never accepted when it is NaN or infinite, an integer never when
it is a bool or a non-integral float. :data:`OPTIONS` names every numeric option once; the Python
API checks its arguments with :func:`check`, the command line parses its flags with
:func:`argument` (as argparse's ``type=``), so both reject the same values with the same words.
In Python, ``check("temperature", float("nan"))`` raises :class:`~fastmlstm.errors.InputError`
"temperature must be a finite number >= 0, got nan"; on the command line::

    $ fastmlstm generate --model m.pt --temperature nan
    fastmlstm generate: error: argument --temperature: must be a finite number >= 0, got 'nan'

:class:`ArgumentParser` is argparse's parser with every error reported as one line,
``<prog>: error: <what is wrong>``, and exit status 2 (argparse prints its usage block first).
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
from dataclasses import dataclass

from .errors import InputError, InputTypeError

__all__ = ["OPTIONS", "ArgumentParser", "Number", "argument", "check", "check_all", "check_each"]


def _is_bool_array(value) -> bool:
    """A bool tensor or NumPy bool (``operator.index`` and ``float`` read them as 0 or 1)."""
    return str(getattr(value, "dtype", "")) in ("torch.bool", "bool")


@dataclass(frozen=True)
class Number:
    """A numeric option: ``kind`` int or float, within [low, high] (an open end where ``*_open``;
    ``None``: unbounded), and ``None`` accepted where ``optional``."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        """What the option takes, in words: "an integer >= 1", "a finite number in [0, 1]"."""
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_show(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_show(self.high)}"
        return noun

    def in_range(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def convert(self, value):
        """``value`` as an int or a float, or raise InputTypeError (a bool, a str, a fractional
        float for an integer option, anything that is not a number)."""
        if isinstance(value, (bool, str, bytes)) or value is None or _is_bool_array(value):
            raise InputTypeError(f"must be {self.describe()}, got {value!r}")
        if self.kind is int:
            if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
                raise InputTypeError(f"must be {self.describe()}, got {value!r}")
            try:
                return operator.index(value)  # ints, numpy integers, integer 0-d tensors
            except TypeError:
                raise InputTypeError(f"must be {self.describe()}, got {value!r}") from None
        try:
            return float(value)  # floats, ints, numpy scalars, 0-d tensors
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"must be {self.describe()}, got {value!r}") from None

    def check(self, value, name: str):
        """``value`` converted (int or float, or None where optional); raises :class:`InputError`
        (:class:`InputTypeError` for a value that is no number) starting with ``name``."""
        if value is None and self.optional:
            return None
        try:
            number = self.convert(value)
        except InputTypeError as exc:
            raise InputTypeError(f"{name} {exc}") from None
        if (self.kind is float and not math.isfinite(number)) or not self.in_range(number):
            raise InputError(f"{name} must be {self.describe()}, got {value!r}")
        return number

    def parse(self, text: str):
        """A command-line value: the number, or :class:`argparse.ArgumentTypeError` saying what is wrong."""
        try:
            number = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if (self.kind is float and not math.isfinite(number)) or not self.in_range(number):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return number


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e16 else f"{bound:g}"


# Seeds go to torch, numpy and scikit-learn (whose limit is 2**32 - 1); the probe adds small offsets.
_SEED = Number(int, 0, 2**31 - 1)

# Every numeric option, by the name the Python API gives it (a flag's name with '-' for '_').
OPTIONS: dict[str, Number] = {
    # training (fastmlstm train, fastmlstm.training.train)
    "lr": Number(float, 0, low_open=True),
    "clip": Number(float, 0),  # 0 turns clipping off
    "steps": Number(int, 1, optional=True),  # None: one epoch
    "hidden": Number(int, 1),
    "embed": Number(int, 1),
    "batch": Number(int, 1),
    "seq": Number(int, 1),
    "eval_every": Number(int, 0),  # 0: only at the end
    "ckpt_every": Number(int, 0),
    "log_every": Number(int, 1),
    "keep": Number(int, 1),
    "eval_bytes": Number(int, 0, optional=True),  # None: the preset's share
    "seed": _SEED,
    # sampling (ByteLM.generate, probe.steer, fastmlstm generate)
    "temperature": Number(float, 0),  # 0: the most likely byte
    "n_bytes": Number(int, 0),
    "num_samples": Number(int, 1),
    "top_k": Number(int, 1, 256, optional=True),
    "unit": Number(int, 0),  # a hidden unit; its upper bound is the model's H
    "cell_value": Number(float),  # a value a unit's cell state is held at
    # featurizing and probing (featurize, evaluate, fastmlstm featurize / probe / visualize)
    "batch_size": Number(int, 1, optional=True),
    "chunk_size": Number(int, 1, optional=True),
    "limit": Number(int, 2, optional=True),  # a split needs two examples
    "draws": Number(int, 1),
    "width": Number(int, 1),
    "scale": Number(float, 0, low_open=True, optional=True),
    # the module (FastMLSTM, ByteLM)
    "input_size": Number(int, 1),
    "hidden_size": Number(int, 1),
    "num_layers": Number(int, 1),
    "dropout": Number(float, 0, 1),
    # downloads
    "timeout": Number(float, 0, low_open=True, optional=True),
    # the environment ($FASTMLSTM_CPU_CACHE_MB)
    "cpu_cache_mb": Number(int, 0),  # 0 turns the CPU backend's buffer cache off
}


def check_each(values, spec: Number, rule: str, at: str = " at index {i}") -> list:
    """Each of ``values`` converted by ``spec``; one that is no number of its kind raises
    :class:`InputTypeError`, one out of its range :class:`InputError`, both as ``"<rule>, got <value>"``
    and where (``at`` formatted with the index ``i``; ``rule``: e.g. ``"units must be unit indices,
    integers in [0, 16)"``)."""
    out = []
    for i, value in enumerate(values):
        try:
            number = spec.convert(value)
        except InputTypeError:
            raise InputTypeError(f"{rule}, got {value!r}{at.format(i=i)}") from None
        if not spec.in_range(number):
            raise InputError(f"{rule}, got {number!r}{at.format(i=i)}")
        out.append(number)
    return out


def check(option: str, value, name: str | None = None):
    """``value`` checked against :data:`OPTIONS` ``[option]`` and converted (int or float, or None
    where the option allows it). ``name`` is how the message calls it (default: ``option``).

    Example::

        >>> check("top_k", 40)
        40
        >>> check("lr", 0)
        Traceback (most recent call last):
        fastmlstm.errors.InputError: lr must be a finite number > 0, got 0
    """
    return OPTIONS[option].check(value, option if name is None else name)


def check_all(values: dict, *, flags: bool = False) -> dict:
    """Every ``{option: value}`` checked; returns them converted. With ``flags`` the messages name
    the command-line flag (``--eval-every``) instead of the Python name."""
    return {key: check(key, value, "--" + key.replace("_", "-") if flags else key) for key, value in values.items()}


def argument(option: str):
    """argparse's ``type=`` for :data:`OPTIONS` ``[option]``: parses a flag's text and rejects NaN,
    inf and values outside the range with one line naming the flag."""
    spec = OPTIONS[option]

    def parse(text: str):
        return spec.parse(text)

    parse.__name__ = option  # argparse names the type in some messages
    parse.option = option  # lets tests find every numeric flag and its range
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line, ``<prog>: error: <message>`` (exit status 2),
    without the usage block: a malformed command line reads like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
