"""fastmlstm: fused kernels for the weight-normalized multiplicative LSTM of Radford et al. (2017).

Public API:
    FastMLSTM                       drop-in for torch.nn.LSTM
    ByteLM                          the byte-level language model; load / save model files
    multiplicative_lstm             functional form over a whole sequence
    multiplicative_lstm_recurrence  the fused recurrence on precomputed input projections
    multiplicative_lstm_step        one step of it on [B, I], for generation loops
    available_backends, resolve_backend, BackendUnavailableError
    load_openai, save_openai        the paper's released weights (a directory of 15 .npy files)
    from_pretrained, save_pretrained  a model by path, registered name ("openai-sentiment") or Hub id;
                                    the config.json + model.safetensors folder (ByteLM.save_pretrained)
    self_check                      parity of a backend against the reference, as `fastmlstm info` runs it
    InputError (and its variants)   what every rejection of bad input raises
    probe, datasets, download,      the probe toolkit, the evaluation sets, the evaluation sets'
    hub, training                   downloader, the Hugging Face Hub transfer, and the training job
                                    (imported on first use)
    nn, ops, models, data           the layers of the library: modules and functional forms; the
                                    recurrence's backends behind one door; the byte model and its
                                    files; corpora, evaluation sets and downloads
"""

from ._version import __version__
from .ops.registry import BACKENDS, BackendUnavailableError, available_backends, backend_status, resolve_backend
from .diagnostics import self_check
from .errors import InputError, InputTypeError, MissingInputError, ModelFileError
from .nn.functional import (
    SUPPORTED_DTYPES,
    multiplicative_lstm,
    multiplicative_lstm_recurrence,
    multiplicative_lstm_step,
)
from .models.lm import ByteLM
from .nn.modules import FastMLSTM, MLSTMWeights, weight_norm
from .models.serialization import from_pretrained, load, load_openai, save, save_openai, save_pretrained

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
    "multiplicative_lstm_step",
    "resolve_backend",
    "save",
    "save_openai",
    "save_pretrained",
    "self_check",
    "weight_norm",
]


def __getattr__(name: str):
    # Submodules imported on first use, not with fastmlstm: the probe toolkit pulls in scikit-learn
    # and matplotlib, the others are seldom needed.
    # (`import a.b as m` imports first and then reads the attribute the import set: `from . import
    # probe` would ask this function again before importing, and never end.)
    if name == "probe":
        import fastmlstm.probe as module
    elif name == "training":
        import fastmlstm.training as module
    elif name == "datasets":
        import fastmlstm.data.datasets as module
    elif name == "download":
        import fastmlstm.data.download as module
    elif name == "hub":
        import fastmlstm.models.hub as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return module
