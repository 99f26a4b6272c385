"""Recurrence backends and the dispatch glue.

Every backend module (``reference``, ``triton``, ``cuda``, ``cpu``) provides the same two functions,
``forward`` and ``backward``, with the contract written down in :mod:`fastmlstm.ops.common`.
:mod:`fastmlstm.ops.op` registers them with ``torch.library`` as one autograd-aware custom op.
"""
