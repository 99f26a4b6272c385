"""The layer as PyTorch code sees it: :class:`FastMLSTM` (a drop-in for ``torch.nn.LSTM``), its
functional forms, weight normalization and the effective-weight cache.

- :mod:`.modules`: ``FastMLSTM``, ``MLSTMWeights``, ``weight_norm``.
- :mod:`.functional`: ``multiplicative_lstm`` (whole sequences from x),
  ``multiplicative_lstm_recurrence`` (precomputed input projections) and ``multiplicative_lstm_step``
  (one step, for generation loops), with their input checks.
- :mod:`.weight_cache`: effective weights kept while a module's parameters are unchanged.
- :mod:`.packing`: the reverse direction's reading order and PackedSequence outputs.
- :mod:`.precision`: 16-bit products on CPUs without native 16-bit GEMMs.
"""

from .functional import SUPPORTED_DTYPES, multiplicative_lstm, multiplicative_lstm_recurrence, multiplicative_lstm_step
from .modules import FastMLSTM, MLSTMWeights, weight_norm

__all__ = ["FastMLSTM", "MLSTMWeights", "SUPPORTED_DTYPES", "multiplicative_lstm", "multiplicative_lstm_recurrence",
           "multiplicative_lstm_step", "weight_norm"]
