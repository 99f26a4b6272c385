"""fastmlstm: fused kernels for the weight-normalized multiplicative LSTM of Radford et al. (2017).

Public API:
    FastMLSTM                       drop-in for torch.nn.LSTM (num_layers=1)
    ByteLM                          the byte-level language model; load / save model files
    multiplicative_lstm             functional form over a whole sequence
    multiplicative_lstm_recurrence  the fused recurrence on precomputed input projections
    available_backends, resolve_backend, BackendUnavailableError
    load_openai, save_openai        the paper's released weights (a directory of 15 .npy files)
    probe, datasets, download       the probe toolkit, the evaluation sets and their downloader
                                    (subpackages, imported on first use)
"""

from .backends import BACKENDS, BackendUnavailableError, available_backends, backend_status, resolve_backend
from .functional import SUPPORTED_DTYPES, multiplicative_lstm, multiplicative_lstm_recurrence
from .checkpoint import load, save
from .lm import ByteLM
from .modules import FastMLSTM, MLSTMWeights, weight_norm
from .openai_weights import load_openai, save_openai

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ByteLM",
    "FastMLSTM",
    "MLSTMWeights",
    "SUPPORTED_DTYPES",
    "available_backends",
    "load",
    "load_openai",
    "backend_status",
    "multiplicative_lstm",
    "multiplicative_lstm_recurrence",
    "resolve_backend",
    "save",
    "save_openai",
    "weight_norm",
]


_SUBMODULES = ("probe", "datasets", "download")


def __getattr__(name: str):
    # The probe toolkit pulls in scikit-learn and matplotlib: import it on first use, not with fastmlstm.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
