"""The reverse direction's reading order and PackedSequence outputs, for :class:`FastMLSTM`.

The reverse direction reads each row backwards within its own length (``lengths=`` or a
PackedSequence), then puts its outputs back in input order; a packed input gets a packed output
with the input's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .functional import multiplicative_lstm

__all__ = ["repack", "run_reversed"]


def _reverse_index(T: int, lengths, device) -> Tensor | None:
    """[T, B] time index that reverses each row within its length (positions past it stay put);
    None when every row is full length (a plain flip)."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, dtype=torch.int64).to(device)
    t = torch.arange(T, device=device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _reorder(x: Tensor, index: Tensor | None) -> Tensor:
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def run_reversed(x, weights, state, lengths, backend, return_cell_states):
    """The reverse direction: each row read backwards from its last valid step. The same
    permutation (an involution) puts the outputs back in input order."""
    index = _reverse_index(x.shape[0], lengths, x.device)
    out, state, *cells = multiplicative_lstm(_reorder(x, index), *weights, initial_state=state, lengths=lengths,
                                             return_cell_states=return_cell_states, backend=backend)
    return _reorder(out, index), state, *(_reorder(c, index) for c in cells)


def repack(padded: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a time-major padded tensor (rows in the original order) with ``like``'s layout."""
    if like.sorted_indices is not None:
        padded = padded.index_select(1, like.sorted_indices)
        lengths = lengths.index_select(0, like.sorted_indices.cpu())
    data = pack_padded_sequence(padded, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
