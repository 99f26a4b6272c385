"""Launch configurations measured on GPUs by bench/kernels/gpu_check.sh (its correctness-gated sweep), read
by :func:`fastmlstm.ops.triton.configs.plan`. Generated: edit by re-running the sweep, not by hand.

Each entry: device (torch.cuda.get_device_properties(...).name), dtype, precision, B, H, configs
(one KernelConfig dict per kernel), and the measured step times that chose it.
"""

ENTRIES: list[dict] = []
