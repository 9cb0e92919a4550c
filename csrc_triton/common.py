"""Device helpers shared by fastlora's kernels, and the CompileSpec record.

Weight format (DESIGN.md): W [N, K] flattened row-major; value j sits in byte j // 2, high
nibble when j is even; its scale is absmax[j // QBLOCK] (blocks may straddle rows). With double
quantisation absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset, two separately rounded
fp32 operations: launchers pass enable_fp_fusion=False so the GPU does not fuse them into an FMA
(which would change the last bit relative to bitsandbytes).

Arguments every weight-reading kernel takes, in this order:
    packed_ptr   uint8 [ceil(N*K/2)]   the packed weight (quant_storage viewed as bytes)
    absmax_ptr   fp32 [nblocks] or uint8 [nblocks] (DOUBLE_QUANT)
    absmax2_ptr  fp32 [ceil(nblocks/256)]   (DOUBLE_QUANT; else any valid pointer)
    code2_ptr    fp32 [256]                 (DOUBLE_QUANT; else any valid pointer)
    offset_ptr   fp32 [1]                   (DOUBLE_QUANT; else any valid pointer)
    code_ptr     fp32 [16]                  NF4 or FP4 table
"""

from __future__ import annotations

from dataclasses import dataclass, field

import triton
import triton.language as tl

NESTED_BLOCK = tl.constexpr(256)  # bnb compresses absmax in blocks of 256


@dataclass(frozen=True)
class CompileSpec:
    """One kernel x config to compile ahead of time (fastlora.compile_report).

    signature: Triton type string per non-constexpr argument ("*fp16", "i32", ...);
    constexprs: the constexpr values (block sizes and feature flags) of this config;
    aligned: arguments a real launch specialises as multiples of 16 (pointers 16-byte aligned,
    extents and strides of real model shapes). Triton's launcher adds these divisibility hints
    itself when they hold; compiling without them models a misaligned launch, whose index math
    alone costs tens of registers."""

    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    archs: tuple = ("sm_80", "sm_90")
    uses_dot: bool = True
    label: str = ""
    options: dict = field(default_factory=dict)
    aligned: tuple = ()

    @property
    def config(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        extra = f" {self.label}" if self.label else ""
        return f"{blocks} w{self.num_warps} s{self.num_stages}{extra}"


@triton.jit
def block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx, mask,
                 DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of quantisation blocks `block_idx` (int64, any shape); 0 where ~mask."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + q, mask=mask, other=0.0)
        a2 = tl.load(absmax2_ptr + block_idx // NESTED_BLOCK, mask=mask, other=0.0)
        scale = c2 * a2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)
    return scale


@triton.jit
def decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                  flat_idx, mask, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 values of weight elements at flattened indices `flat_idx` (int64, any shape):
    code[nibble] * absmax[flat_idx // QBLOCK]; 0 where ~mask. Each byte is read once per
    element that uses it (both nibbles of a byte sit next to each other, so the two reads hit
    the same cache line)."""
    byte = tl.load(packed_ptr + (flat_idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((flat_idx & 1) ^ 1).to(tl.int32) * 4  # even index -> high nibble
    nibble = (byte >> shift) & 0xF
    code = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat_idx // QBLOCK,
                         mask, DOUBLE_QUANT)
    return code * scale


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, threshold):
    """bool [BM, BK]: keep element (m, k) of a [*, K] activation. One Philox draw per element
    at offset m * K + k (int64), kept when the uint32 draw >= threshold; fastlora.reference
    reproduces the same stream bit for bit."""
    idx = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    draw = tl.randint(seed, idx)
    return draw.to(tl.int64) >= threshold
