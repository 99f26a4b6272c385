"""fastmlstm: fused kernels for the weight-normalized multiplicative LSTM of Radford et al. (2017).

Public API:
    FastMLSTM                       drop-in for torch.nn.LSTM (num_layers=1)
    ByteLM                          the byte-level language model; load / save model files
    multiplicative_lstm             functional form over a whole sequence
    multiplicative_lstm_recurrence  the fused recurrence on precomputed input projections
    available_backends, resolve_backend, BackendUnavailableError
"""

from .backends import BACKENDS, BackendUnavailableError, available_backends, backend_status, resolve_backend
from .functional import SUPPORTED_DTYPES, multiplicative_lstm, multiplicative_lstm_recurrence
from .checkpoint import load, save
from .lm import ByteLM
from .modules import FastMLSTM, MLSTMWeights, weight_norm

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
    "backend_status",
    "multiplicative_lstm",
    "multiplicative_lstm_recurrence",
    "resolve_backend",
    "save",
    "weight_norm",
]
