"""What the benchmark feeds and what it costs: the featurize texts (read through
``fastmlstm.datasets``) and MODEL.md's FLOP and byte arithmetic for the roofline."""

from __future__ import annotations

import random

from fastmlstm.data import datasets
from fastmlstm.probe import preprocess

__all__ = ["SYNTHETIC", "batch_shapes", "cost", "load_texts", "preprocess"]

# Fitted to SST-2 train after preprocessing (6,920 sentences): ln(bytes) has mean 4.50 and standard
# deviation 0.58; lengths span 6..258 bytes (median 100).
SYNTHETIC = {"mu": 4.50, "sigma": 0.58, "min": 6, "max": 258}


def _synthetic_texts(n: int, rng: random.Random) -> list[str]:
    texts = []
    for _ in range(n):
        length = int(min(SYNTHETIC["max"], max(SYNTHETIC["min"],
                                               round(rng.lognormvariate(SYNTHETIC["mu"], SYNTHETIC["sigma"])))))
        texts.append("x" + "".join(chr(rng.randrange(33, 127)) for _ in range(length - 4)))
    return texts


def load_texts(n: int, seed: int = 0) -> tuple[list[str], dict]:
    """``n`` raw texts: a seeded sample of SST-2 train sentences (``fastmlstm.datasets.load("sst2")``
    from ``$FASTMLSTM_DATA``), or, when the data is absent, synthetic printable-ASCII texts whose
    preprocessed lengths follow SST-2's (``SYNTHETIC``)."""
    rng = random.Random(seed)
    try:
        sentences = datasets.load("sst2")["train"].texts
    except datasets.DatasetNotFoundError:
        texts = _synthetic_texts(n, rng)
        source = f"synthetic (SST-2 data absent): lognormal lengths {SYNTHETIC}, printable ASCII"
    else:
        texts = rng.sample(sentences, min(n, len(sentences)))
        source = (f"SST-2 train (fastmlstm.datasets.load('sst2') from {datasets.dataset_dir('sst2')}), "
                  f"seeded sample of {len(texts)} of {len(sentences)} sentences")
    lengths = sorted(len(preprocess(t)) for t in texts)
    info = {"source": source, "n_texts": len(texts), "bytes": sum(lengths),
            "median_bytes": lengths[len(lengths) // 2] if lengths else 0, "max_bytes": lengths[-1] if lengths else 0}
    return texts, info


def batch_shapes(texts: list[str], batch: int) -> list[tuple[int, int]]:
    """(rows, steps) of each batch when the preprocessed texts are sorted longest first and taken
    ``batch`` at a time (what featurize runs)."""
    lengths = sorted((len(preprocess(t)) for t in texts), reverse=True)
    return [(len(lengths[i : i + batch]), lengths[i]) for i in range(0, len(lengths), batch)]


def cost(family: str, mode: str, H: int, B: int, T: int, I: int, elem_bytes: int,
         batches: list[tuple[int, int]] | None = None, params: int = 0) -> tuple[float, float]:
    """(FLOPs, bytes) floor of one call, MODEL.md's arithmetic.

    Recurrent weights per step: 5H^2 (multiplicative LSTM: W_hh 4H^2 + W_hm H^2) or 4H^2 (LSTM);
    they do not stay on chip at these sizes, so every step reads them once (forward) and once more
    in the backward. FLOPs: 2 per weight per batch row per step; the backward does the forward's
    work twice (input and weight gradients). Bytes otherwise count each input and output once (step:
    x, h, c in, h, c out; fwd+bwd: x and the output gradient in, the output and the gradients of the
    input and of every weight out); saved activations are not counted (they are the implementation's
    choice), so the byte floor is a lower bound. featurize: per batch of b rows and t steps. train:
    fwd+bwd, plus the readout (3 x 2*T*B*H*256 FLOPs) and Adam over float32 parameters (28 bytes per
    parameter).
    """
    w_rec = (5 if family == "mlstm" else 4) * H * H
    w_in = (5 if family == "mlstm" else 4) * H * I
    s = elem_bytes
    if mode == "fwd":
        return 2.0 * T * B * (w_rec + w_in), s * (T * w_rec + w_in + T * B * (I + H))
    if mode == "fwd+bwd":
        return 6.0 * T * B * (w_rec + w_in), s * (2 * T * w_rec + 2 * w_in + (w_rec + w_in) + 2 * T * B * (I + H))
    if mode == "step":
        return 2.0 * B * (w_rec + w_in), s * (w_rec + w_in + B * (I + 4 * H))
    if mode == "featurize":
        flops = sum(2.0 * b * t * w_rec for b, t in batches)
        nbytes = sum(s * t * w_rec + b * t for b, t in batches)
        return flops, nbytes
    if mode == "train":
        flops, nbytes = cost(family, "fwd+bwd", H, B, T, I, elem_bytes)
        return flops + 6.0 * T * B * H * 256, nbytes + 28.0 * params
    raise ValueError(mode)


