"""fastmlstm: fused kernels for the weight-normalized multiplicative LSTM of Radford et al. (2017).

Public API:
    FastMLSTM                       drop-in for torch.nn.LSTM (num_layers=1)
    multiplicative_lstm             functional form over a whole sequence
    multiplicative_lstm_recurrence  the fused recurrence on precomputed input projections
    available_backends, resolve_backend, BackendUnavailableError
"""

from .backends import BACKENDS, BackendUnavailableError, available_backends, backend_status, resolve_backend
from .functional import SUPPORTED_DTYPES, multiplicative_lstm, multiplicative_lstm_recurrence
from .modules import FastMLSTM, MLSTMWeights, weight_norm

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FastMLSTM",
    "MLSTMWeights",
    "SUPPORTED_DTYPES",
    "available_backends",
    "backend_status",
    "multiplicative_lstm",
    "multiplicative_lstm_recurrence",
    "resolve_backend",
    "weight_norm",
]
