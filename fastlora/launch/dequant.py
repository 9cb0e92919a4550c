"""Launcher of csrc_triton/dequant.py."""

from __future__ import annotations

import torch
import triton

from ..quant import QuantState
from .common import LAUNCH_OPTIONS, decode_flags, kernel_entry, weight_args


@kernel_entry
def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           dtype: torch.dtype) -> torch.Tensor:
    """Kernel path of fastlora.dequantize_4bit (inputs already validated there)."""
    from csrc_triton import dequant

    n = state.numel
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    flags = decode_flags(packed, state, dequant.BLOCK)
    # whole BLOCKs from word loads; the rest (and a packed tensor off 4-byte alignment) per
    # element, in a second launch
    whole = n // dequant.BLOCK if packed.data_ptr() % 4 == 0 else 0
    args = (*weight_args(packed, state), out)
    options = dict(QBLOCK=state.blocksize, DOUBLE_QUANT=state.nested, BLOCK=dequant.BLOCK,
                   LANE_TABLE=flags["LANE_TABLE"], num_warps=dequant.NUM_WARPS, **LAUNCH_OPTIONS)
    if whole:
        dequant._dequant_4bit_kernel[(whole,)](*args, 0, n, WORDS=True, **options)
    start = whole * dequant.BLOCK
    if start < n:
        dequant._dequant_4bit_kernel[(triton.cdiv(n - start, dequant.BLOCK),)](
            *args, start, n, WORDS=False, **options)
    return out
