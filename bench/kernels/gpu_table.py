"""The GPUs the cost model (``costmodel.py``) predicts for: one number per quantity and GPU, each
with its source. "assumption" marks a number nobody has measured on these parts;
``bench/kernels/gpu_check.sh`` measures those first (:func:`assumptions` lists them).
"""

from __future__ import annotations

import dataclasses

# One row per quantity: (name, H100 SXM, H200, source). "assumption" marks a number nobody measured
# for these parts: bench/kernels/gpu_check.sh measures it on the first GPU run.
_GPU_BENCHES = "te42kyfo/gpu-benches (github), "
TABLE = [
    ("sms", 132, 132,
     ("NVIDIA H100 datasheet / Hopper whitepaper (SXM5: 132 SMs); H200: PyTorch reported 132 "
     "multiprocessors on this workplace's H200 (.library/device/KINDS.md, 2026-10-28)")),
    ("clock_GHz", 1.98, 1.98,
     ("SM clock under load: nvidia-smi read 1980 MHz on this workplace's H200 just after bf16 matrix "
     "products (KINDS.md, 2026-10-28); 1980 MHz is also the H100 SXM5's maximum boost")),
    ("hbm_TBps", 3.35, 4.8, "NVIDIA H100 SXM and H200 SXM datasheets (peak HBM3 / HBM3e bandwidth)"),
    ("hbm_efficiency", 0.90, 0.90,
     ("measured here: a device-to-device copy moved about 3.0 TB/s on an H100 80GB HBM3 (KINDS.md, "
     "2026-11-13) and 4.3 TB/s on an H200 (KINDS.md, 2026-10-28 and 2026-11-04), 0.90 of each datasheet")),
    ("l2_MB", 50, 60,
     "H100: Hopper whitepaper (50 MB on SXM5); H200: 60 MB as PyTorch reported it here (KINDS.md, 2026-10-28)"),
    ("l2_TBps", 9.0, 9.8,
     _GPU_BENCHES + "gpu-l2-cache (each block re-reads a 128-512 kB slice of a data set that stays in "
     "L2): h200.txt 9.7-10.2 TB/s for 5-40 MB data sets (an H200, 132 SMs); h100_pcie.txt 6.9-7.1 TB/s "
     "for 6-33 MB (114 SMs, 1.755 GHz), which scaled by SMs x clock to the SXM part (132 SMs, 1.98 "
     "GHz, x1.31) gives 9.0-9.3. H100 SXM: 9.0 (the scaled low end); H200: 9.8 (its measured middle)"),
    ("l2_keep_MB", 25, 30,
     ("assumption: weights a persistent kernel can keep in L2 across steps by loading them with an "
      "evict-last policy while the rest of each step's traffic streams past: half of the L2 (50 MB on "
      "the H100 SXM, Hopper whitepaper; 60 MB on the H200 as PyTorch reported it here). The gpu-l2-cache "
      "run on an H100 PCIe (te42kyfo/gpu-benches, h100_pcie.txt) kept full bandwidth for data sets up to "
      "about 33 of its 50 MB; nobody has measured the eviction policy's effect here")),
    ("sm_ingest_GBps", 127, 127,
     ("assumption: 64 bytes per clock per SM from L2 at 1.98 GHz (the gpu-l2-cache run above reached "
     "13.5 TB/s over the H200's 132 SMs from a 1.5 MB data set, 102 GB/s per SM, so at least that)")),
    ("mma_TFLOPs_16bit", 798, 788,
     ("measured here: an 8192^3 bf16 matmul on random data ran at 798 TFLOP/s on an H100 80GB HBM3 "
     "(KINDS.md, 2026-11-13) and 788 on an H200 (KINDS.md, 2026-10-28)")),
    ("mma_peak_TFLOPs_16bit", 989, 989, "H100 SXM and H200 datasheets: 989 TFLOP/s dense bf16 (the floor's rate)"),
    ("mma_TFLOPs_tf32", 394, 394, "datasheets' 494 dense TF32, scaled by the measured bf16 fraction (788/989)"),
    ("fma_TFLOPs_fp32", 67, 67, "NVIDIA H100 SXM / H200 datasheets (FP32, non-tensor)"),
    ("hbm_latency_us", 0.8, 0.8,
     "assumption: HBM load latency under load (idle it is about 650 cycles, 0.33 us at 1.98 GHz: "
     + _GPU_BENCHES + "gpu-latency/h100_pcie.txt)"),
    ("l2_latency_us", 0.3, 0.3,
     ("assumption: an L2 hit or atomic round trip under load (idle: 265 cycles in the near partition, "
     "475 in the far one, gpu-latency/h100_pcie.txt)")),
    ("l2_idle_latency_cycles", 475, 475,
     _GPU_BENCHES + "gpu-latency/h100_pcie.txt: pointer chasing from one warp, 475 cycles for data sets "
     "of 35-50 MB (the far L2 partition); the same GH100 L2 in the SXM parts. The floor's cost of a "
     "grid-wide dependency: one such round trip"),
    ("grid_sync_us", 1.0, 1.0,
     ("assumption: one grid-wide step dependency in a persistent kernel with 132 CTAs (release fence, "
     "arrival on L2 flags or a counter, polling until the last arrives): about three loaded L2 round "
     "trips plus arrival skew. Zhang et al., 'A Study of Single and Multi-device Synchronization Methods in "
      "Nvidia GPUs' (arXiv 2004.05371), measured grid synchronisation on GPUs before Hopper")),
    ("cluster_sync_us", 0.15, 0.15, "assumption: barrier.cluster arrive.release + wait.acquire, about 300 cycles"),
    ("dsmem_latency_us", 0.1, 0.1,
     ("assumption: one remote shared-memory access in the cluster, about 200 cycles; Luo et al., 'Benchmarking "
      "and Dissecting the Nvidia Hopper GPU Architecture' (arXiv 2402.13499), measured distributed shared "
      "memory on an H800, its throughput depending on cluster and block size")),
    ("smem_bytes_per_clock", 128, 128,
     "CUDA programming guide, compute capability 9.0: 32 banks of 4 bytes per clock per SM"),
    ("launch_gap_us", 2.0, 2.0,
     "assumption: gap between dependent kernels in one stream, no PDL; gpu_check.sh measures it"),
    ("pdl_gap_us", 0.5, 0.5,
     ("assumption: what programmatic dependent launch leaves of the gap (the wait for the previous grid's "
     "memory flush)")),
    ("cpu_launch_us", 12.0, 12.0,
     ("host time of one launch from Python: Triton 3.x's JITFunction dispatch was measured by others at "
     "8.7 us (vLLM PR 34838, GB200 host, 2026), ~11 us (tritonbench PR 1002, 2026) and 12.5 us for a "
     "19-argument kernel (facebookexperimental/triton PR 1231, 2026); our kernels take 15-20 arguments. "
     "Plus fastmlstm's own side, 1.4-2.6 us (bench/kernels/launch_overhead.py, bench/results/"
     "launch-overhead-amd-epyc-family-25-model-1-2026-11-30.json); gpu_check.sh measures the whole")),
    ("smem_block_KB", 227, 227, "CUDA programming guide, compute capability 9.0: 227 KB of shared memory per block"),
    ("smem_sm_KB", 228, 228, "CUDA programming guide, compute capability 9.0: 228 KB of shared memory per SM"),
    ("regfile_sm_KB", 256, 256, "CUDA programming guide, compute capability 9.0: 64 K 32-bit registers per SM"),
]
GPU_NAMES = ("H100-SXM", "H200")

GPU = dataclasses.make_dataclass("GPU", [("name", str)] + [(row[0], float) for row in TABLE], frozen=True)
GPU.__doc__ = "One GPU's numbers, as in TABLE (names and units there)."


def gpus(**overrides) -> dict[str, GPU]:
    """The table as GPU records; ``overrides`` replace a quantity for every GPU (e.g. measured values)."""
    out = {}
    for i, name in enumerate(GPU_NAMES):
        values = {row[0]: row[1 + i] for row in TABLE}
        values.update(overrides)
        out[name] = GPU(name=name, **values)
    return out


GPUS = gpus()


def assumptions() -> list[str]:
    """The table's quantities nobody has measured on these parts (gpu_check.sh measures them first)."""
    return [name for name, _, _, source in TABLE if source.startswith("assumption")]


def gpu_of_device_name(name: str) -> str | None:
    """The model's GPU for a CUDA device name (torch.cuda.get_device_name), if it models it."""
    if "H200" in name:
        return "H200"
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return "H100-SXM"
    return None
