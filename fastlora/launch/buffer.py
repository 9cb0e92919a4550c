"""The one dequantized-weight buffer of the "dequantize + cuBLAS" base path (launch/dispatch.py).

fastlora's dequantize kernel writes a layer's W [N, K] into a flat buffer that every layer
shares: one per (device, dtype, CUDA stream), grown to the largest layer seen, overwritten by
the next layer's call. Nothing is kept per layer: between two calls it holds whatever the last
layer wrote, and no call ever reads a previous call's weight. Its cost is N*K*e bytes of the
largest layer (e = 2 for bf16/fp16, 4 for fp32): 117 MB for Llama-3-8B's MLP (14336 x 4096 in
bf16).

    FASTLORA_DEQUANT_BUFFER_MB   the size cap in MiB (default 1024; 0: never allocate). A shape
                                 whose buffer would pass it always takes the fused path.
    set_dequant_buffer_cap_mb(mb)        the same from Python (None: back to the environment)
    release_dequant_buffer()     free every buffer (fastlora.unpatch calls it); the next call
                                 on the dequantize path allocates again

Ordering. Kernels on one stream run in launch order, so "dequantize into the buffer, then the
matmul that reads it" is safe as long as no other thread enqueues its own dequantize in
between: `weight()` is a context manager holding the buffer's lock from the dequantize to the
end of the caller's enqueue (microseconds on a GPU; the kernels run asynchronously). Buffers
are per stream, so two streams never share one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

__all__ = ["weight", "fits", "cap_bytes", "set_dequant_buffer_cap_mb", "release_dequant_buffer",
           "allocated_bytes", "DEFAULT_CAP_MB"]

DEFAULT_CAP_MB = 1024
_ENV = "FASTLORA_DEQUANT_BUFFER_MB"

_cap_override_mb: Optional[float] = None
_BUFFERS: dict = {}          # (device, dtype, stream id) -> flat 1-D tensor
_LOCK = threading.RLock()    # guards _BUFFERS and each dequantize + enqueue (see the doc)


def set_dequant_buffer_cap_mb(mb: Optional[float]) -> None:
    """Cap the buffer at `mb` MiB (0: the dequantize path never runs); None: read
    FASTLORA_DEQUANT_BUFFER_MB again. A buffer already larger than a new cap is freed."""
    global _cap_override_mb
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float))
                           or not mb >= 0):
        raise ValueError(f"the dequant buffer cap must be a number of MiB >= 0, got {mb!r}")
    _cap_override_mb = None if mb is None else float(mb)
    with _LOCK:
        for key in [k for k, b in _BUFFERS.items() if _nbytes(b) > cap_bytes()]:
            del _BUFFERS[key]


def cap_bytes() -> int:
    """The cap in bytes: set_dequant_buffer_cap_mb, else FASTLORA_DEQUANT_BUFFER_MB, else 1 GiB."""
    mb = _cap_override_mb
    if mb is None:
        text = os.environ.get(_ENV, "").strip()
        try:
            mb = float(text) if text else DEFAULT_CAP_MB
        except ValueError:
            raise ValueError(f"{_ENV} must be a number of MiB >= 0, got {text!r}") from None
        if not mb >= 0:
            raise ValueError(f"{_ENV} must be a number of MiB >= 0, got {text!r}")
    return int(mb * 2**20)


def fits(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a [n, k] weight in `dtype` fits under the cap."""
    return n * k * torch.finfo(dtype).bits // 8 <= cap_bytes()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


@contextlib.contextmanager
def weight(packed: torch.Tensor, state, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """deq(W) [N, K] in `dtype`, written by fastlora's dequantize kernel into the shared buffer
    (grown first when this layer is larger than any before). Use it only inside the `with`:
    the lock is held until the block ends, and the next call overwrites it."""
    from .dequant import dequantize_4bit_triton

    n, k = state.shape
    device = packed.device
    key = (str(device), dtype, _stream_id(device))
    with _LOCK:
        flat = _BUFFERS.get(key)
        if flat is None or flat.numel() < n * k:
            if key in _BUFFERS:
                del _BUFFERS[key], flat  # free the smaller one before allocating (peak memory)
            flat = _BUFFERS[key] = torch.empty(n * k, dtype=dtype, device=device)
        w = flat[: n * k].view(n, k)
        dequantize_4bit_triton(packed, state, dtype, out=w)
        yield w


def release_dequant_buffer() -> int:
    """Free every dequantize buffer; returns the bytes released (their memory goes back to
    torch's caching allocator: torch.cuda.empty_cache() returns it to the driver)."""
    with _LOCK:
        freed = allocated_bytes()
        _BUFFERS.clear()
    return freed


def allocated_bytes() -> int:
    """Bytes held by the buffers now."""
    with _LOCK:
        return sum(_nbytes(b) for b in _BUFFERS.values())
