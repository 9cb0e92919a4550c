"""Launcher of csrc_triton/dequant.py."""

from __future__ import annotations

import torch
import triton

from ..quant import QuantState
from .common import LAUNCH_OPTIONS, kernel_entry, weight_args


@kernel_entry
def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           dtype: torch.dtype) -> torch.Tensor:
    """Kernel path of fastlora.dequantize_4bit (inputs already validated there)."""
    from csrc_triton import dequant

    n = state.numel
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, dequant.BLOCK),)
    dequant._dequant_4bit_kernel[grid](
        *weight_args(packed, state), out, n,
        QBLOCK=state.blocksize, DOUBLE_QUANT=state.nested, BLOCK=dequant.BLOCK,
        num_warps=dequant.NUM_WARPS, **LAUNCH_OPTIONS)
    return out
