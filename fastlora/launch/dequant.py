"""Launcher of csrc_triton/dequant.py."""

from __future__ import annotations

import torch
import triton

from ..quant import QuantState
from .common import LAUNCH_OPTIONS, kernel_entry, lane_table, weight_args, words_aligned


@kernel_entry
def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel path of fastlora.dequantize_4bit (inputs already validated there).

    out: where to write W [N, K] (contiguous, `dtype`, packed's device; the dequantize +
    cuBLAS path passes a view of its shared buffer, launch/buffer.py); None allocates."""
    from csrc_triton import dequant

    n = state.numel
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    elif (tuple(out.shape) != tuple(state.shape) or out.dtype != dtype
          or out.device != packed.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {tuple(state.shape)} {dtype} tensor on "
                         f"{packed.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    # whole BLOCKs from word loads; the rest (and a packed tensor off 4-byte alignment) per
    # element, in a second launch
    whole = n // dequant.BLOCK if words_aligned(packed) else 0
    args = (*weight_args(packed, state), out)
    options = dict(QBLOCK=state.blocksize, DOUBLE_QUANT=state.nested, BLOCK=dequant.BLOCK,
                   LANE_TABLE=lane_table(), num_warps=dequant.NUM_WARPS, **LAUNCH_OPTIONS)
    if whole:
        dequant._dequant_4bit_kernel[(whole,)](*args, 0, n, WORDS=True, **options)
    start = whole * dequant.BLOCK
    if start < n:
        dequant._dequant_4bit_kernel[(triton.cdiv(n - start, dequant.BLOCK),)](
            *args, start, n, WORDS=False, **options)
    return out
