"""Dequantisation: packed bitsandbytes 4-bit weight -> dense [N, K] in fp32/fp16/bf16.

Not on the fused training path (that never materialises W); it backs
fastlora.dequantize_4bit. Elementwise, no tl.dot: CUDA cores only, memory-bound (reads 0.5 B +
scales, writes 2-4 B per element), so its loop must cost under ~4.6 lane-instructions per value
on sm_90 (DESIGN.md). The weight is one flat row here: each program decodes BLOCK values with
common.decode_tile (int32 words, register code table, one scale per quantisation block), and
the tail past the last whole BLOCK (or a packed tensor not 4-byte aligned) takes
common.decode_weight per element, in a second launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import CompileSpec, decode_tile, decode_weight, lane_table

# 1024 elements per program, 4 warps: 8 elements per thread (one 32-bit word of packed bytes,
# one 16-byte store for bf16 outputs). The interpreter uses the same config (one program costs
# ~ms there).
BLOCK = 1024
NUM_WARPS = 4
# the modelled HBM share every shipped config must reach (issue 10); measured 1.00 on both archs
HBM_CEILING = 0.80


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                         out_ptr, start, n_elements,
                         QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
                         WORDS: tl.constexpr, LANE_TABLE: tl.constexpr):
    """out[j] = code[nibble j] * absmax[j // QBLOCK] rounded once to out's dtype, for
    j in [start + pid * BLOCK, +BLOCK) and j < n_elements.

    packed_ptr uint8 [ceil(n/2)]; absmax/absmax2/code2/offset/code as in common.py;
    out_ptr fp32/fp16/bf16 [n_elements] (the [N, K] weight, row-major). WORDS: every program's
    BLOCK values lie below n_elements, start is 0 and packed_ptr is 4-byte aligned (the
    launcher's whole-block launch); otherwise the per-element path (the tail)."""
    tl.static_assert(BLOCK % 8 == 0, "BLOCK must be a multiple of 8 (one word: 8 values)")
    tl.static_assert(QBLOCK >= 32, "bitsandbytes blocksizes start at 32")
    table = lane_table(code_ptr, LANE_TABLE)
    first = start + tl.program_id(0).to(tl.int64) * BLOCK  # n_elements may pass 2^31
    offs = first + tl.arange(0, BLOCK)
    if WORDS:
        # the flat weight as one row [1, n_elements]; first is a multiple of BLOCK
        values = tl.reshape(decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                        offset_ptr, table, tl.zeros((1,), tl.int32), first,
                                        1, n_elements, 1, BLOCK, QBLOCK, DOUBLE_QUANT, True,
                                        LANE_TABLE), (BLOCK,))
        mask = None
    else:
        mask = offs < n_elements
        values = decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                               table, offs, mask, QBLOCK, DOUBLE_QUANT, LANE_TABLE)
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=mask)


def _spec(out_dtype: str, double_quant: bool) -> CompileSpec:
    absmax_t = "*u8" if double_quant else "*fp32"
    return CompileSpec(
        kernel="_dequant_4bit_kernel", fn=_dequant_4bit_kernel,
        signature={"packed_ptr": "*u8", "absmax_ptr": absmax_t, "absmax2_ptr": "*fp32",
                   "code2_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
                   "out_ptr": f"*{out_dtype}", "start": "i64", "n_elements": "i64"},
        constexprs={"QBLOCK": 64, "DOUBLE_QUANT": double_quant, "BLOCK": BLOCK,
                    "WORDS": True, "LANE_TABLE": True},
        num_warps=NUM_WARPS, num_stages=1, uses_dot=False,
        label=f"out={out_dtype} dq={int(double_quant)}",
        options={"enable_fp_fusion": False},
        # no loop: one program is the trip; BLOCK / 2 packed bytes read, BLOCK values written
        trip_bytes=BLOCK // 2 + BLOCK * (4 if out_dtype == "fp32" else 2),
        ceiling_target=HBM_CEILING)


COMPILE_SPECS = [_spec(dt, dq) for dt in ("bf16", "fp16", "fp32") for dq in (True, False)]
