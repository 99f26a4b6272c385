"""Steered generation (paper, Table 5): sample with a unit's cell value held fixed at every step."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InputError, InputTypeError
from ..options import check
from .features import check_model

__all__ = ["steer"]


def steer(
    model,
    unit: int,
    values: Mapping[str, float] | None = None,
    *,
    unit_sign: int = 1,
    prefix: str | bytes = "\n ",
    n_bytes: int = 200,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = 0,
) -> dict[str, list[str]]:
    """Samples with ``unit``'s cell state held at each value, from ``prefix``.

    Args:
        model: a :class:`~fastmlstm.ByteLM`.
        unit: the unit to hold (the sentiment unit of a probe: ``probe.sentiment_unit``).
        values: ``{name: cell value}`` (finite numbers); default ``{"positive": +1, "negative": -1}``,
            the paper's.
        unit_sign: multiplies every value: pass ``probe.unit_sign`` so that "positive" holds the
            unit on the side the probe reads as positive (-1 when the unit is anti-correlated).
        prefix: text the samples continue (the paper's start token ``"\\n "`` by default).
        n_bytes, num_samples, temperature, top_k: as in :meth:`ByteLM.generate`.
        seed: each setting is sampled with this seed, so the settings differ only in the held value.

    Returns:
        ``{name: [num_samples decoded samples]}`` (prefix not included; invalid UTF-8 from the
        byte model decoded as U+FFFD).

    Example::

        >>> steer(model, unit=2388, prefix="This product", n_bytes=120)   # doctest: +SKIP
        {'positive': ['... is great, I love it ...', ...], 'negative': [...]}
    """
    check_model(model)
    if unit_sign not in (1, -1) or isinstance(unit_sign, bool):
        raise InputError(f"unit_sign must be +1 or -1, got {unit_sign!r}")
    unit = check("unit", unit)
    if values is not None and not isinstance(values, Mapping):
        raise InputTypeError(f"values must be a mapping {{name: cell value}}, got {type(values).__name__}")
    values = {"positive": 1.0, "negative": -1.0} if values is None else dict(values)
    if not values:
        raise InputError("values is empty")
    values = {name: check("cell_value", value, f"values[{name!r}]") for name, value in values.items()}
    out = {}
    for name, value in values.items():
        samples = model.generate(prefix, n_bytes, temperature, num_samples=num_samples,
                                 fixed_units={unit: unit_sign * value}, top_k=top_k, seed=seed)
        out[name] = [s.decode("utf-8", errors="replace") for s in samples]
    return out
