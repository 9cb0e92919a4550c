"""Dequantisation: packed bitsandbytes 4-bit weight -> dense [N, K] in fp32/fp16/bf16.

Not on the fused training path (that never materialises W); it backs
fastlora.dequantize_4bit and is the format's first kernel through the whole pipeline.
Elementwise, no tl.dot: CUDA cores only, memory-bound (reads 0.5 B + scales, writes 2-4 B per
element).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import CompileSpec, decode_weight

# 1024 elements per program, 4 warps: 8 elements per thread, one 16-byte store per thread for
# bf16 outputs. The interpreter uses the same config (one program costs ~ms there).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                         out_ptr, n_elements,
                         QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = code[nibble j] * absmax[j // QBLOCK] rounded once to out's dtype.

    packed_ptr uint8 [ceil(n/2)]; absmax/absmax2/code2/offset/code as in common.py;
    out_ptr fp32/fp16/bf16 [n_elements] (the [N, K] weight, row-major)."""
    tl.static_assert(BLOCK % 2 == 0, "BLOCK must be even (two values per byte)")
    tl.static_assert(QBLOCK >= 32, "bitsandbytes blocksizes start at 32")
    pid = tl.program_id(0).to(tl.int64)  # n_elements may pass 2^31
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    values = decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                           offs, mask, QBLOCK, DOUBLE_QUANT)
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=mask)


def _spec(out_dtype: str, double_quant: bool) -> CompileSpec:
    absmax_t = "*u8" if double_quant else "*fp32"
    return CompileSpec(
        kernel="_dequant_4bit_kernel", fn=_dequant_4bit_kernel,
        signature={"packed_ptr": "*u8", "absmax_ptr": absmax_t, "absmax2_ptr": "*fp32",
                   "code2_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
                   "out_ptr": f"*{out_dtype}", "n_elements": "i64"},
        constexprs={"QBLOCK": 64, "DOUBLE_QUANT": double_quant, "BLOCK": BLOCK},
        num_warps=NUM_WARPS, num_stages=1, uses_dot=False,
        label=f"out={out_dtype} dq={int(double_quant)}",
        options={"enable_fp_fusion": False})


COMPILE_SPECS = [_spec(dt, dq) for dt in ("bf16", "fp16", "fp32") for dq in (True, False)]
