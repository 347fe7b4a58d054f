"""Know the ceiling: measured matmul throughput and memory bandwidth of the device in use.

Model FLOPs utilisation (MFU) and the bandwidth floor for decoding are only meaningful against
numbers measured on the same machine in the same run, so trainers and benchmarks call these.
"""

from __future__ import annotations

import contextlib
import time

import torch

# dense bf16 peak of common accelerators, FLOP/s (vendor figures, no sparsity)
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def pick_device(name: str = "auto") -> torch.device:
    """auto = cuda, then mps, then cpu; an explicit name that is unavailable is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise RuntimeError("device 'mps' was asked for but it is not available")
    return torch.device(name)


def _timeit(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 1024,
    repeats: int = 5,
) -> float:
    """Best-of-N FLOP/s of an n x n x n matmul: the practical peak MFU is measured against."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timeit(lambda: a @ b, device, repeats)


def memory_bandwidth(
    device: torch.device | str = "cpu", mbytes: int = 256, repeats: int = 5
) -> float:
    """Bytes/s of reading a large buffer (a sum over it): the bound for batch-1 decoding."""
    device = torch.device(device)
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    return x.numel() * 4 / _timeit(lambda: x.sum(), device, repeats)


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: allocated GPU memory on CUDA, resident set size on a
    CPU (which also counts Python, torch's libraries and the touched pages of mapped data)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast(device: torch.device):
    """bf16 autocast on CUDA; CPUs here have no fast bf16, so they stay fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
