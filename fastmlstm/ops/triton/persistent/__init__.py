"""Persistent Gluon kernels for Hopper (sm_90a): one launch runs every step of a call.

- :mod:`.schedule`: which CTA computes what, as data (the kernels, the CPU executor and the cost
  model read the same :class:`~.schedule.Schedule`).
- :mod:`.executor`: runs a schedule on the CPU with torch, CTAs interleaved in random orders.

Importing this package imports neither Triton's Gluon nor torch.cuda; nothing runs on import.
"""
