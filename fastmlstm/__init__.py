"""fastmlstm: fused kernels for the weight-normalized multiplicative LSTM of Radford et al. (2017).

Public API:
    FastMLSTM                       drop-in for torch.nn.LSTM
    ByteLM                          the byte-level language model; load / save model files
    multiplicative_lstm             functional form over a whole sequence
    multiplicative_lstm_recurrence  the fused recurrence on precomputed input projections
    available_backends, resolve_backend, BackendUnavailableError
    load_openai, save_openai        the paper's released weights (a directory of 15 .npy files)
    from_pretrained, save_pretrained  a model by path, registered name ("openai-sentiment") or Hub id;
                                    the config.json + model.safetensors folder (ByteLM.save_pretrained)
    self_check                      parity of a backend against the reference, as `fastmlstm info` runs it
    InputError (and its variants)   what every rejection of bad input raises
    probe, datasets, download,      the probe toolkit, the evaluation sets, the downloader (datasets
    hub, training                   and pretrained models), the Hugging Face Hub transfer, and the
                                    training job (submodules, imported on first use)
"""

from ._version import __version__
from .backends import BACKENDS, BackendUnavailableError, available_backends, backend_status, resolve_backend
from .diagnostics import self_check
from .errors import InputError, InputTypeError, MissingInputError, ModelFileError
from .functional import SUPPORTED_DTYPES, multiplicative_lstm, multiplicative_lstm_recurrence
from .lm import ByteLM
from .modules import FastMLSTM, MLSTMWeights, weight_norm
from .serialization import from_pretrained, load, load_openai, save, save_openai, save_pretrained

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ByteLM",
    "FastMLSTM",
    "InputError",
    "InputTypeError",
    "MLSTMWeights",
    "MissingInputError",
    "ModelFileError",
    "SUPPORTED_DTYPES",
    "__version__",
    "available_backends",
    "backend_status",
    "from_pretrained",
    "load",
    "load_openai",
    "multiplicative_lstm",
    "multiplicative_lstm_recurrence",
    "resolve_backend",
    "save",
    "save_openai",
    "save_pretrained",
    "self_check",
    "weight_norm",
]


_SUBMODULES = ("probe", "datasets", "download", "hub", "training")


def __getattr__(name: str):
    # The probe toolkit pulls in scikit-learn and matplotlib: import it on first use, not with fastmlstm.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
