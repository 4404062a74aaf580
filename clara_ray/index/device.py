"""Where a FAISS shard runs: GPU when FAISS has one and the config allows it, else CPU.

Kept apart from shard.py (and free of a faiss import) so the config can name the
choice and the decision can be tested with any module that looks like faiss.
"""

from __future__ import annotations

import enum


class IndexDevice(str, enum.Enum):
    AUTO = "auto"  # GPU when present, CPU otherwise (also for factories FAISS has no GPU version of)
    CPU = "cpu"
    GPU = "gpu"  # required: fail if FAISS sees no GPU


def faiss_gpu_count(faiss_module) -> int:
    """GPUs FAISS can use: 0 for the CPU wheel, which lacks StandardGpuResources."""
    if not hasattr(faiss_module, "StandardGpuResources"):
        return 0
    return int(faiss_module.get_num_gpus())


def resolve_device(requested: IndexDevice, faiss_module) -> IndexDevice:
    """AUTO/CPU/GPU -> the concrete CPU or GPU this process will use."""
    requested = IndexDevice(requested)
    if requested is IndexDevice.CPU:
        return IndexDevice.CPU
    has_gpu = faiss_gpu_count(faiss_module) > 0
    if requested is IndexDevice.GPU and not has_gpu:
        raise RuntimeError(
            "index.device is 'gpu' but FAISS sees no GPU here (a CPU-only faiss wheel, or no CUDA device "
            "visible to this process: give the shard actors index.num_gpus_per_shard > 0). "
            "Use index.device=auto to fall back to CPU."
        )
    return IndexDevice.GPU if has_gpu else IndexDevice.CPU
