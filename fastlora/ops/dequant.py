"""`fastlora.dequantize_4bit`: the packed weight decoded to a dense tensor, by the Triton kernel
(csrc_triton/dequant.py) or the PyTorch decoder, as the backend says (fastlora.backend)."""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_dequant_dtype
from ..launch.selfcheck import use_kernels  # backend choice + the GPU decode self-check
from ..quant import QuantState, dequantize_4bit_torch

__all__ = ["dequantize_4bit"]


def dequantize_4bit(packed: torch.Tensor, state: QuantState,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode `packed` to a `dtype` [N, K] tensor (default: the weight's original dtype).

    Runs the Triton kernel (csrc_triton/dequant.py) when the backend is Triton and the PyTorch
    decoder otherwise; both equal bitsandbytes' dequantize_4bit bit for bit.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a fastlora.QuantState (use QuantState.from_bnb), "
                        f"got {type(state).__name__}")
    state.validate(packed)
    dtype = state.dtype if dtype is None else dtype
    check_dequant_dtype(dtype)
    if use_kernels(packed, state.quant_type):
        from ..launch.dequant import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state, dtype)
    return dequantize_4bit_torch(packed, state, dtype)
