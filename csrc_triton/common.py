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

# Pointer arguments whose tensors stay far below 2^31 elements for any real layer, so 32-bit
# offsets address them safely: the 16/256-entry code tables, the offset scalar, absmax2
# (N*K / (blocksize * 256) values), bias [N], lora_A [r <= 256, K] and lora_B [N, r] (K, N < 2^23).
# Every other pointer (x, dy, dx, y, U, dU, the packed weight, absmax, workspaces) must be
# addressed with at least one 64-bit offset: fastlora.compilecheck verifies it on the TTIR.
BOUNDED_ARGS = ("code_ptr", "code2_ptr", "offset_ptr", "absmax2_ptr", "bias_ptr", "a_ptr",
                "b_ptr")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel x config to compile ahead of time (fastlora.compile_report).

    signature: Triton type string per non-constexpr argument ("*fp16", "i32", ...);
    constexprs: the constexpr values (block sizes and feature flags) of this config;
    aligned: arguments a real launch specialises as multiples of 16 (pointers 16-byte aligned,
    extents and strides of real model shapes). Triton's launcher adds these divisibility hints
    itself when they hold; compiling without them models a misaligned launch, whose index math
    alone costs tens of registers.
    fma_dot: every tl.dot runs on fp32 operands at input_precision "ieee" (full fp32), which
    has no tensor-core instruction on sm_80/sm_90 and runs on the FMA units: the compile check
    expects NO HMMA/HGMMA for such a spec (one would mean tf32 rounding)."""

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
    bounded_args: tuple = BOUNDED_ARGS
    fma_dot: bool = False

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
def grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
    """(row tile, other tile) of program `pid` in the L2-friendly order of Triton tutorial 03:
    GROUP_M row tiles sweep the other dimension's tiles together, so the weight tiles they all
    need are decoded while still in L2 (read from HBM once per group, not once per row tile)."""
    per_group = GROUP_M * num_other
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, threshold):
    """bool [BM, BK]: keep element (m, k) of a [*, K] activation. One Philox draw per element
    at offset m * K + k (int64), kept when the uint32 draw >= threshold; fastlora.reference
    reproduces the same stream bit for bit."""
    idx = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    draw = tl.randint(seed, idx)
    return draw.to(tl.int64) >= threshold


@triton.jit
def decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of deq(W): rows offs_n, columns k0 .. k0 + BLOCK_K - 1;
    0 outside N x K. k0 must be a multiple of BLOCK_K.

    K_ALIGNED (K % QBLOCK == 0, true for every real layer): rows start on a byte and on a
    quantisation block, so the tile's bytes are loaded once as [BLOCK_N, BLOCK_K / 2]
    (vectorised, both nibbles split in registers) and the scales as one value per row and
    QBLOCK-wide sub-block. Otherwise (odd K, blocks straddling rows) every element finds its
    own byte and block: common.decode_weight."""
    row_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    if K_ALIGNED:
        # Both powers of two: BLOCK_K covers SUB whole blocks, or lies inside one block.
        SUB: tl.constexpr = (BLOCK_K + QBLOCK - 1) // QBLOCK
        half = tl.arange(0, BLOCK_K // 2)
        byte_ok = row_ok[:, None] & ((k0 + 2 * half) < K)[None, :]
        byte_ptrs = packed_ptr + (rows * (K // 2) + k0 // 2)[:, None] + half[None, :]
        byte = tl.load(byte_ptrs, mask=byte_ok, other=0).to(tl.int32)
        # value 2i is the high nibble of byte i: join puts it first, reshape interleaves
        nibble = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K))
        code = tl.load(code_ptr + nibble)  # nibble is 0..15: always in bounds
        sub = tl.arange(0, SUB)
        block_idx = ((rows * K + k0) // QBLOCK)[:, None] + sub[None, :]
        block_ok = row_ok[:, None] & ((k0 + sub * QBLOCK) < K)[None, :]
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx,
                             block_ok, DOUBLE_QUANT)
        w = tl.reshape(tl.reshape(code, (BLOCK_N, SUB, BLOCK_K // SUB)) * scale[:, :, None],
                       (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        flat = rows[:, None] * K + offs_k[None, :]
        mask = row_ok[:, None] & (offs_k < K)[None, :]
        w = decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                          flat, mask, QBLOCK, DOUBLE_QUANT)
    return w


@triton.jit
def load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] tile of x (its dtype), zero outside M x K; strides honoured
    (int64 offsets: a strided view can pass 2^31 elements)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = (x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
            + offs_k.to(tl.int64)[None, :] * stride_xk)
    return tl.load(ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)


# ----------------------------------------------------------------------------- config helpers

def m_bucket(m: int) -> int:
    """The autotune key's M: the next power of two, 32 .. 8192 (larger M reuses 8192's pick)."""
    return min(8192, max(32, triton.next_power_of_2(m)))


def weight_signature(double_quant: bool) -> dict:
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
            "code_ptr": "*fp32"}
