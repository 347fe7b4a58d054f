"""The quantized matrix-product kernels of `qmm.c`, compiled once per machine with the system C
compiler and called through ctypes.

The one idea: PyTorch's own weight-only kernels (`_weight_int8pack_mm`, the int4 pack) run
several times slower than an fp32 matrix-vector product on an AVX2 CPU, so they would make a
quantized model decode slower, not faster. A small C file does better: it reads one byte (int8)
or half a byte (int4) per weight and multiplies with integer multiply-adds against int16
activations (2^-15 of each 32-value block's largest value: far below the weights' rounding), in
fp32 per block. Compiling it
needs only `cc` (no PyTorch headers): well under a second, cached under
~/.cache/lmforge/kernels (or $LMFORGE_CACHE) by a hash of the source, the flags and the CPU.
Where there is no compiler, or the build fails, `available()` is False and `QuantLinear`
dequantises to float instead: the same numbers, only slower. LMFORGE_NO_KERNELS=1 forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

MAX_ROWS = 8  # rows of x the kernels take at once (MAX_ROWS in qmm.c); more go through float
SOURCE = Path(__file__).with_name("qmm.c")
_lib: ctypes.CDLL | None = None
_error: str | None = None
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    lib = cache / "kernels" / f"qmm-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build aside, then rename
            out = Path(tmp) / lib.name
            res = subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True
            )
            if res.returncode:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, lib)
    dll = ctypes.CDLL(str(lib))
    i, p = ctypes.c_int, ctypes.c_void_p
    dll.q8_matmul.argtypes = [p, i, i, p, p, i, p, p, i]
    dll.q4_matmul.argtypes = [p, i, i, p, p, p, i, i, p, p, i]
    dll.q8_matmul.restype = dll.q4_matmul.restype = None
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (and `error()` says why) if unavailable."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                if os.environ.get("LMFORGE_NO_KERNELS"):
                    _error = "disabled by LMFORGE_NO_KERNELS"
                elif platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
                    _error = f"not built for {platform.machine()}"
                else:
                    try:
                        _lib = _build()
                    except (OSError, RuntimeError) as e:
                        _error = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def error() -> str | None:
    library()
    return _error


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def q8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 contiguous, q (N, K) int8, scale (N,) float32 -> (M, N)."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    scratch = torch.empty(M * K // 2 + M * K // 32, dtype=torch.float32)  # int16 x + scales
    _lib.q8_matmul(
        _ptr(x), M, K, _ptr(q), _ptr(scale), N, _ptr(y), _ptr(scratch), torch.get_num_threads()
    )
    return y


def q4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> torch.Tensor:
    """x (M, K) float32 contiguous, packed (N, K/2) uint8, scale (N, K/group) float32,
    zero (N, K/group) float32 -> (M, N)."""
    M, K = x.shape
    N = packed.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    scratch = torch.empty(M * K // 2 + M * K // 32 + M * K // group, dtype=torch.float32)
    _lib.q4_matmul(
        _ptr(x),
        M,
        K,
        _ptr(packed),
        _ptr(scale),
        _ptr(zero),
        group,
        N,
        _ptr(y),
        _ptr(scratch),
        torch.get_num_threads(),
    )
    return y
