"""The fused forward (DESIGN.md, "The math"):

    U = dropout(x) @ A^T                       _lora_u_kernel
    y = x @ deq(W)^T + s * U @ B^T + bias      _nf4_lora_fwd_kernel
    both, one pass over x (no dropout)         _nf4_lora_fwd_one_pass_kernel (issue 30, part
                                               4: faster on narrow layers and short launches
                                               only; a GPU times it; ONE_PASS_CONFIGS)

The main kernel never materialises deq(W): each K step loads the packed bytes of a
[BLOCK_N, BLOCK_K] weight tile, decodes them in registers (code[nibble] * absmax, double-quant
absmax decoded on the fly, no cached decoded absmax), casts to x's dtype and feeds tl.dot with an
fp32 accumulator. That accumulator starts as s * U_tile @ B_tile^T (lora_init: tl.dot over
unrolled rank chunks of up to 64, zero-padded past r), so the epilogue only adds the bias and
stores once in x's dtype.

Tile orientation (constexpr W_FIRST): on sm_90 the kernel computes y^T tiles,
acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so the decoded weight tile is the FIRST operand of
tl.dot and wgmma reads it straight from registers (SASS `HGMMA ... R..`) instead of a
shared-memory round trip; x^T, the second operand, is read from shared memory as wgmma wants.
On sm_80 (mma.sync takes both operands from registers) the plain orientation is used, except
for fp32 at full precision ('ieee': FMA dots, no tensor cores), where y^T tiles spill less
(SM80_IEEE_CONFIGS).

M <= 16 goes to csrc_triton/small_m.py (split-K, reads each packed byte once).
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from .common import (CompileSpec, SiblingFix, SM80_SIBLINGS, by_triton, decode_tile,
                     dropout_keep, dropout_seed, grouped_tile, row_dropout, sibling_config,
                     sibling_configs, sibling_specs, segment_factor, segment_of_rows,
                     lane_table, load_x_tile, weight_signature)


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def lora_init(offs_m, offs_n, M, N, R, u_ptr, b_ptr, stride_um, stride_ur, stride_bn,
              stride_br, scaling, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, W_FIRST: tl.constexpr):
    """fp32 scaling * U_tile @ B_tile^T, [BLOCK_M, BLOCK_N], or its transpose when W_FIRST:
    the GEMM accumulator's initial value, so the base product adds onto it in the same fp32
    registers (no second [BLOCK_M, BLOCK_N] tile live next to the accumulator: at 256 x 128
    that second tile spilled ~550 B).

    u_ptr [M, R], b_ptr [N, R] in the activation dtype. BLOCK_R: the rank padded to a power of
    two >= 16 (rank_block); it runs in unrolled chunks of at most 64 on tensor cores
    (zero-padded past R), so no loop of the kernel's SASS but the K loop holds MMAs."""
    CHUNK: tl.constexpr = BLOCK_R if BLOCK_R < 32 else 32
    m_ok = offs_m < M
    n_ok = offs_n < N
    u_rows = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    if W_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, CHUNK):
        offs_r = r0 + tl.arange(0, CHUNK)
        r_ok = offs_r < R
        u = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
        b = tl.load(b_rows + offs_r[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        if W_FIRST:
            acc = tl.dot(b, tl.trans(u), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
    return acc * scaling


@triton.jit
def store_y(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, stride_ym, stride_yn,
            HAS_BIAS: tl.constexpr, W_FIRST: tl.constexpr):
    """Store y tile = acc + bias once, in y's dtype. acc: fp32 [BLOCK_M, BLOCK_N], or its
    transpose [BLOCK_N, BLOCK_M] when W_FIRST; bias_ptr [N] in y's dtype (HAS_BIAS)."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    if W_FIRST:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = (y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym
                  + offs_n.to(tl.int64)[:, None] * stride_yn)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = (y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym
                  + offs_n.to(tl.int64)[None, :] * stride_yn)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _lora_u_kernel(x_ptr, a_ptr, u_ptr, M, K, R,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
                   seed_ptr, seed_hi, threshold, keep_scale,
                   row_seg_ptr, col_seg_ptr, col_scale_ptr, seg_thr_ptr, seg_keep_ptr,
                   HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
                   SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u = dropout(x) @ A^T, one program per BLOCK_M rows and the whole (padded) rank.

    x_ptr [M, K], a_ptr [R, K] (lora_A), u_ptr [M, R], all fp16/bf16/fp32 (x's dtype).
    seed_ptr, seed_hi: the dropout seed, its low word read here from the device (never on the
    host, so a captured CUDA graph replays whatever the seed draw before it wrote: issue 30),
    its high word a parameter (common.dropout_seed).
    Dropout keeps element (m, k) when its 16-bit Philox draw at offset m * K + k is >=
    threshold (common.dropout_keep; DROPOUT_GROUPED: K % 8 == 0, one call per 8 elements;
    reproduced by fastlora.reference) and scales kept values by keep_scale = 1 / (1 - p) in
    fp32, rounded once to x's dtype before the tl.dot: bit for bit reference.apply_dropout.

    SEGMENTED (a mixed batch, fastlora/launch/mixed.py): a_ptr holds G adapters' A side by
    side (R = their summed rank); row_seg_ptr int32 [M] each row's adapter slot (-1: none),
    col_seg_ptr int32 [R] each column's slot, col_scale_ptr fp32 [R] its adapter's scaling;
    seg_thr_ptr int32 [G] / seg_keep_ptr fp32 [G] each slot's dropout threshold and keep scale
    (replacing threshold / keep_scale). u[m, r] = scaling * (dropout(x) @ A^T)[m, r] where
    column r is row m's adapter's, else 0, in fp32 before the one rounding. Otherwise those
    five pointers are unread."""
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs the padded rank >= 16")
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    thr = threshold
    scale = keep_scale
    seed = dropout_seed(seed_ptr, seed_hi)  # unread (compiled out) without dropout
    if SEGMENTED:
        seg = segment_of_rows(row_seg_ptr, offs_m, M)
        if HAS_DROPOUT:
            thr, scale = row_dropout(seg, seg_thr_ptr, seg_keep_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, k0, K, thr, BLOCK_M, BLOCK_K, DROPOUT_GROUPED)
            # fp32 elementwise: the interpreter's bf16 arithmetic is wrong (DESIGN.md)
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + offs_k.to(tl.int64)[:, None] * stride_ak
                      + offs_r[None, :] * stride_ar,
                      mask=(offs_k < K)[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    if SEGMENTED:
        acc = acc * segment_factor(seg, col_seg_ptr, col_scale_ptr, offs_r, R)
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & r_ok[None, :])


@triton.jit
def _nf4_lora_fwd_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                         code_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                         M, N, K, R, M_BUCKET,
                         stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br,
                         stride_ym, stride_yn, scaling,
                         QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, W_FIRST: tl.constexpr,
                         LANE_TABLE: tl.constexpr):
    """y = x @ deq(W)^T + scaling * u @ B^T + bias, one program per [BLOCK_M, BLOCK_N] tile.

    x_ptr [M, K] (any strides), u_ptr [M, R], b_ptr [N, R] (lora_B), bias_ptr [N] (HAS_BIAS),
    y_ptr [M, N]: all in x's dtype (fp16/bf16/fp32); weight pointers as in common.py, the
    packed weight [N, K] flattened row-major. M_BUCKET only feeds the autotune key.
    PRECISION: tl.dot input_precision ("tf32" or "ieee"; only fp32 activations read it).
    LANE_TABLE: the code table in registers (common.lane_table; compiled GPU kernels only)."""
    tl.static_assert(QBLOCK >= 32, "bitsandbytes blocksizes start at 32")
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs the padded rank >= 16")
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    table = lane_table(code_ptr, LANE_TABLE)
    acc = lora_init(offs_m, offs_n, M, N, R, u_ptr, b_ptr, stride_um, stride_ur, stride_bn,
                    stride_br, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, W_FIRST)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED,
                        LANE_TABLE)
        w = w.to(x_ptr.dtype.element_ty)  # one rounding of code * absmax, as bitsandbytes
        if W_FIRST:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    store_y(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS, W_FIRST)


@triton.jit
def _nf4_lora_fwd_one_pass_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                  offset_ptr, code_ptr, a_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                                  M, N, K, R, M_BUCKET,
                                  stride_xm, stride_xk, stride_ar, stride_ak, stride_um,
                                  stride_ur, stride_bn, stride_br, stride_ym, stride_yn,
                                  scaling,
                                  QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                                  K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                  W_FIRST: tl.constexpr, LANE_TABLE: tl.constexpr):
    """U = x @ A^T and y = x @ deq(W)^T + scaling * U @ B^T + bias in ONE pass over x (issue 30,
    part 4; no dropout): each program also makes its rows' U = x @ A^T from the x tiles its K
    loop loads anyway (r / BLOCK_N more MMA work, and x read from shared memory a second time
    for that product), adds scaling * U @ B_tile^T after the loop (U rounded to x's dtype
    first, as the two-launch path's stored U), and the programs of the first N tile store U
    (every program of a row block makes the same U, bit for bit). Arguments as
    _nf4_lora_fwd_kernel's, plus a_ptr [R, K] (lora_A, x's dtype); u_ptr [M, R] is written.

    Where it pays: the loop's second read of x costs more than the U kernel's pass over x unless
    N is small (the U kernel's share of the layer goes as 1 / N; fastlora.bench.model
    .one_pass_pays), so on a GPU the dispatcher times it against the two-launch path at a
    shape's first call (fastlora/launch/forward.py)."""
    tl.static_assert(QBLOCK >= 32, "bitsandbytes blocksizes start at 32")
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs the padded rank >= 16")
    act = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    table = lane_table(code_ptr, LANE_TABLE)
    if W_FIRST:  # y^T and U^T tiles: the decoded W and A are the first dot operands
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        u = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED,
                        LANE_TABLE)
        w = w.to(act)  # one rounding of code * absmax, as bitsandbytes
        if W_FIRST:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            u = tl.dot(a, tl.trans(x), u, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            u = tl.dot(x, tl.trans(a), u, input_precision=PRECISION)
    u = u.to(act)
    b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=(offs_n < N)[:, None] & r_ok[None, :], other=0.0)
    rows = offs_m.to(tl.int64)
    if W_FIRST:
        acc += tl.dot(b, u, input_precision=PRECISION) * scaling
        if pid_n == 0:
            tl.store(u_ptr + rows[None, :] * stride_um + offs_r[:, None] * stride_ur, u,
                     mask=r_ok[:, None] & (offs_m < M)[None, :])
    else:
        acc += tl.dot(u, tl.trans(b), input_precision=PRECISION) * scaling
        if pid_n == 0:
            tl.store(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur, u,
                     mask=(offs_m < M)[:, None] & r_ok[None, :])
    store_y(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS, W_FIRST)


# ----------------------------------------------------------------------------- configs

def rank_block(rank: int) -> int:
    """BLOCK_R of _lora_u_kernel: the rank padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rank))


# On sm_80's siblings (common.SM80_SIBLINGS; Triton 3.9): fp32 (tf32) at r 256 needs 155,648 B
# of shared memory at BLOCK_K 64, over their 101,376: BLOCK_K 32 takes 77,824 B (at r 128 it
# spills 16 B on sm_86 / sm_89, where BLOCK_K 64 fits in 90,112 B). On sm_120 the
# r = 64 tiles spill 8-24 B at 3 stages (16-bit with or without dropout, fp32 with); 2 stages
# hold them (143-180 registers).
# sm_100 (B200, issue 31): its tcgen05 MMA reads the decoded weight tile from tensor memory
# (STTM) and x by descriptor, both through the 128 B/clock shared-memory pipe, so a trip's
# pipe clocks go as ~128 / BLOCK_N + 192 / BLOCK_M per MMA clock and the decode per value is
# what is left to amortise: a deeper K step halves the trip's fixed costs. Modelled (Triton
# 3.9, bf16 / fp16, r 16 / 64): sm_80's 16-bit headline 256x128x32 w8 0.43 of tensor peak,
# 256x128x64 w8 (s3 / s4) 0.48 at 190 registers, no spill, 108-150 KB of shared memory;
# tried and left: 256x128x32 w4 0.48 at 255 registers, 128x256 tiles 0.34-0.37, 256x256
# (its accumulator needs all 512 columns of tensor memory) 0.47 at 255 registers.
SIBLING_FIXES = (
    SiblingFix("_lora_u_kernel", SM80_SIBLINGS, {"BLOCK_R": 256, "BLOCK_K": 64},
               {"BLOCK_K": 32}, fp32=True, ieee=False),
    SiblingFix("_lora_u_kernel", ("sm_120",), {"BLOCK_R": 64, "num_stages": 3},
               {"num_stages": 2}, ieee=False),
    SiblingFix("_nf4_lora_fwd_kernel", ("sm_100",),
               {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8},
               {"BLOCK_K": 64}, fp32=False),
)


def u_config(block_r: int, precision: str = "tf32", fp32: bool = False,
             arch: str = "sm_80") -> dict:
    """The U kernel's config for `arch` (a compile target: sm_80's siblings take
    SIBLING_FIXES); below, sm_80's."""
    cfg = _u_config(block_r, precision, fp32)
    return sibling_config(SIBLING_FIXES, "_lora_u_kernel", arch, cfg, fp32, precision == "ieee")


def _u_config(block_r: int, precision: str = "tf32", fp32: bool = False) -> dict:
    """Config of _lora_u_kernel for a padded rank: 64 rows and 4 warps up to r = 64; 32 rows
    and 8 warps beyond (64 x 128 at 4 warps spills 8 B in fp32 on sm_80, and 16 x 128 at
    4 warps 16 B on sm_90). 16-bit activations at r = 64 take BLOCK_K 128: with dropout the
    modelled HBM share is 0.76 / 0.89 (sm_80 / sm_90) there against 0.73 / 0.90 at 64.

    precision "ieee" (fp32 activations at full precision): tl.dot runs on the FMA units, each
    thread holding its rows of x and columns of A^T over all of BLOCK_K, so from r = 64 on the
    tile is BLOCK_K 32, 8 warps and 4096 / r rows (fp32 registers sm_80 / sm_90: r 64 80 / 110,
    r 128 80 / 118, r 256 80 / 126). The rule above spills there on sm_80: 96 B at r 64 and
    104 B at r 256; BLOCK_K 32 with 32 rows still spills 32 B at r 256 on sm_90."""
    # per Triton release (common.by_triton), ieee with dropout on sm_90: 3.7 spills 8 B at r 64
    # with 3 stages (2: none), 3.5 8 B at r 16 (1: none)
    if precision == "ieee" and block_r >= 64:
        return {"BLOCK_M": 4096 // block_r, "BLOCK_R": block_r, "BLOCK_K": 32,
                "num_warps": 8, "num_stages": by_triton(3, v3_7=2)}
    wide = block_r > 64
    return {"BLOCK_M": 32 if wide else 64, "BLOCK_R": block_r,
            "BLOCK_K": 128 if block_r == 64 and not fp32 else 64,
            "num_warps": 8 if wide else 4,
            "num_stages": by_triton(3, v3_5=1) if precision == "ieee" else 3}


# ----------------------------------------------------------------------------- tiled configs

def _cfg(bm, bn, bk, warps, stages, w_first, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
            "W_FIRST": w_first, "num_warps": warps, "num_stages": stages}


# Every config below compiles with zero spill bytes (STACK 0, LOCAL 0) for its arch and dtype
# class, with K_ALIGNED either way and padded ranks 16 to 64 (COMPILE_SPECS; 16-byte aligned
# arguments as at a real launch). Each tile decodes BLOCK_N x BLOCK_K weight values per trip
# for 2 * BLOCK_M FLOPs each, so the decode's share of the loop falls as BLOCK_M grows: the
# modelled hot-loop ceilings (fastlora.compilecheck, bf16, r 16 / 64) are
#   sm_90 256x128x64 w8: 1.00 / 1.00 (mio-bound at 1024 of 1024 clocks, 233-236 registers),
#         128x128x64 w8 0.57, 128x64x64 w4 0.52, 64x64x128 w4 0.34, 32x64x128 w4 0.19;
#   sm_80 256x128x32 w8 (y^T tiles): 1.10 (249 registers), 256x64x32 w8 0.74,
#         128x128x32 w8 0.70, 64x64x64 w4 0.44, 32x64x64 w4 0.26.
# Measured and dropped: sm_90 256x64x64 w4 (0.82, 255 registers, 8 B spilled at r 64);
# sm_80 256x128x64 w8 (spills), 256x64x64 w8 0.78.
#
# LARGE_M_CONFIGS: what the autotuner times from an M bucket of LARGE_M on (prune_configs), the
# headline configs whose ceilings tests/test_ceilings.py gates; smaller M tries every tile
# (wave quantisation and M edges favour smaller ones there).
LARGE_M = 4096
#
# sm_90: y^T tiles (W_FIRST): the decoded weight tile [BLOCK_N, BLOCK_K] is wgmma's register
# operand (64 rows per warpgroup, so BLOCK_N = 64 * warpgroups or more), x^T its shared one;
# BLOCK_M = 256 is wgmma's widest N.
SM90_LARGE_M_CONFIGS = [_cfg(256, 128, 64, 8, 3, True), _cfg(256, 128, 64, 8, 4, True)]
SM90_CONFIGS = SM90_LARGE_M_CONFIGS + [
    _cfg(128, 128, 64, 8, 3, True),
    _cfg(128, 128, 64, 8, 4, True),
    _cfg(128, 64, 64, 4, 4, True),
    _cfg(64, 64, 128, 4, 4, True),
    _cfg(32, 64, 128, 4, 4, True),
]
# sm_80 and every other mma.sync GPU: y^T tiles for the 256-row headline (mma.sync takes both
# operands from registers; this orientation compiled to fewer instructions), [BLOCK_M, BLOCK_N]
# tiles otherwise.
SM80_LARGE_M_CONFIGS = [_cfg(256, 128, 32, 8, 3, True), _cfg(256, 128, 32, 8, 4, True)]
SM80_CONFIGS = SM80_LARGE_M_CONFIGS + [
    _cfg(128, 128, 32, 8, 3, False),
    _cfg(128, 128, 32, 8, 4, False),
    _cfg(256, 64, 32, 8, 3, False),
    _cfg(64, 64, 64, 4, 4, False),
    _cfg(32, 64, 64, 4, 4, False),
]
# fp32 activations double the operand registers: smaller lists that do not spill.
SM90_FP32_CONFIGS = [_cfg(128, 128, 64, 8, 2, True), _cfg(32, 64, 64, 4, 3, True)]
SM80_FP32_CONFIGS = [_cfg(64, 64, 64, 4, 4, False), _cfg(32, 64, 64, 4, 3, False)]
# K % QBLOCK != 0 (blocks straddle rows): every element gathers its own byte and absmax, and the
# pipeliner stages all of it (~10 bytes of shared memory per weight value and stage: 128x128x64
# at 3 stages needs 262144 B on sm_90, over its 232448): one modest config, not tuned.
# Per Triton release (common.by_triton): 1 stage on 3.5 and 3.6, where 2 spill (sm_90: 16 B in
# bf16, 184 B in fp32 ieee on 3.5; sm_80 on 3.5: 128 B bf16, 176 B fp32).
UNALIGNED_CONFIGS = {"sm_90": by_triton(_cfg(64, 64, 64, 4, 2, True),
                                        v3_5=_cfg(64, 64, 64, 4, 1, True),
                                        v3_6=_cfg(64, 64, 64, 4, 1, True)),
                     "sm_80": by_triton(_cfg(64, 64, 64, 4, 2, False),
                                        v3_5=_cfg(64, 64, 64, 4, 1, False))}

# fp32 activations at full precision (PRECISION "ieee": torch's default allow_tf32=False).
# tl.dot then runs on the FMA units (there is no fp32 x fp32 tensor-core instruction), and
# Triton's FMA dot holds each thread's rows of one operand and columns of the other over the
# whole dot K in registers, so the tf32 lists spill: SM90_FP32_CONFIGS[0] 72 B on sm_90,
# SM80_FP32_CONFIGS[0] 5248 B and [1] 576 B on sm_80, UNALIGNED_CONFIGS["sm_80"] 5600 B.
# sm_90, y^T tiles, spill-free (fp32 registers at r = 16 / r = 64): 128x64x64 w8 220 / 220,
# 64x128x64 w8 254 / 230, 64x64x64 w4 168 / 222, 32x64x64 w4 142 / 128. Measured and dropped:
# 128x128x64 w8 (40 B at 3 or 4 stages), 64x64x128 w4 (456 B), 128x128x32 w8 (40 B),
# 128x64x32 w4 (128 B), 64x64x32 w2 (64 B).
SM90_IEEE_CONFIGS = [
    _cfg(128, 64, 64, 8, 2, True),  # 2 stages: 3 spilled 16 B with the register table
    _cfg(64, 128, 64, 8, 3, True),
    # Triton 3.7: 3 stages spill 8 B at blocksize 32 (2: none)
    by_triton(_cfg(64, 64, 64, 4, 3, True), v3_7=_cfg(64, 64, 64, 4, 2, True)),
    by_triton(_cfg(32, 64, 64, 4, 3, True), v3_7=_cfg(32, 64, 64, 4, 2, True)),
]
# sm_80: with no tensor core in play the reason for [BLOCK_M, BLOCK_N] tiles (mma.sync) is gone
# and y^T tiles are the ones that fit: 64x64x64 w4 spills 5248 B as y, 128 B as y^T; 32x64x32
# w4 spills 0 either way but 64x64x32 w4 504 B as y. BLOCK_K 32 (the dot's K), spill-free
# (r = 16 / r = 64): 64x128x32 w8 255 / 255, 64x64x32 w4 255 / 255, 64x32x32 w4 127 / 128,
# 32x64x32 w4 168 / 122. Dropped: 128x64x32 w8 (8 B), 128x128x32 w8 (8 B), 32x32x64 w4 (264 B
# as y).
SM80_IEEE_CONFIGS = [
    # Triton 3.7: 3 stages spill 8 B at r 64 (1: none, 158 registers)
    by_triton(_cfg(64, 128, 32, 8, 3, True), v3_7=_cfg(64, 128, 32, 8, 1, True)),
    _cfg(64, 64, 32, 4, 3, True),
    _cfg(64, 32, 32, 4, 3, True),
    _cfg(32, 64, 32, 4, 2, True),  # 2 stages: 3 spilled 8 B with the register table
]
# K % QBLOCK != 0 at full precision: sm_90's UNALIGNED_CONFIGS entry fits (194 registers); on
# sm_80 64x32x32 w4 as y^T (128 registers; 64x64x32 w4 spills 16 B, 64x64x64 w4 184 B).
UNALIGNED_IEEE_CONFIGS = {"sm_90": UNALIGNED_CONFIGS["sm_90"],
                          "sm_80": _cfg(64, 32, 32, 4, 2, True)}

# The interpreter's config: its cost is per program instance, and 32x32x32 tiles keep the test
# shapes (M <= 100, N ~ 72, K ~ 256) at a few dozen programs. y^T orientation, as on sm_90.
INTERPRETER_CONFIG = _cfg(32, 32, 32, 4, 1, True, group_m=4)


# The one-pass forward (_nf4_lora_fwd_one_pass_kernel: 16-bit activations, K % QBLOCK == 0, no
# dropout). Its loop holds a second accumulator (U, [BLOCK_M, R_PAD] fp32) and reads x a second
# time from shared memory for U's product, so the 256-row headline tiles spill there (600 B on
# sm_90, 224 B on sm_80 at r 16) and what fits is modelled well below the two-launch path's
# headline tiles (0.67 sm_90, 1.00 sm_80): the base product's share of tensor-core peak, bf16,
# r 16 / 32 / 64,
#   sm_90 128x128x64 w8 0.37 / 0.34 / 0.35 (193 / 196 / 231 registers), 128x64x64 w8 0.25 /
#         0.22 / 0.23;
#   sm_80 128x128x32 w8 y^T 0.45 / 0.43 / 0.38 (220 / 232 / 255), 128x64x32 w8 0.31 / 0.29 /
#         0.25 (128 / 158 / 219).
# Measured and dropped: sm_80 128x64x32 w4 (8 B spilled at r 64), 128x128x64 w8 (192 B).
ONE_PASS_CONFIGS = {"sm_90": [_cfg(128, 128, 64, 8, 3, True), _cfg(128, 64, 64, 8, 3, True)],
                    "sm_80": [_cfg(128, 128, 32, 8, 3, True), _cfg(128, 64, 32, 8, 3, False)]}


def one_pass_configs(arch: str) -> list[dict]:
    """The one-pass forward's autotune list for a compile target (sm_90's, or sm_80's for
    every mma.sync GPU)."""
    return ONE_PASS_CONFIGS["sm_90" if arch == "sm_90" else "sm_80"]


def tiled_configs(arch: str, fp32: bool, k_aligned: bool = True,
                  precision: str = "tf32") -> list[dict]:
    """The autotune list for a compile target ('sm_90', else sm_80's lists, which its
    siblings run with SIBLING_FIXES applied); fp32 activations at precision 'ieee'
    (fastlora.launch.common.dot_precision) get the *_IEEE lists."""
    family = "sm_90" if arch == "sm_90" else "sm_80"
    ieee = fp32 and precision == "ieee"
    if ieee:
        if not k_aligned:
            return [UNALIGNED_IEEE_CONFIGS[family]]
        configs = SM90_IEEE_CONFIGS if family == "sm_90" else SM80_IEEE_CONFIGS
    elif not k_aligned:
        return [UNALIGNED_CONFIGS[family]]
    elif family == "sm_90":
        configs = SM90_FP32_CONFIGS if fp32 else SM90_CONFIGS
    else:
        configs = SM80_FP32_CONFIGS if fp32 else SM80_CONFIGS
    return sibling_configs(SIBLING_FIXES, "_nf4_lora_fwd_kernel", arch, configs, fp32, ieee)


def shared_bytes(cfg: dict, elt: int) -> int:
    """Shared-memory estimate of a config: per pipeline stage the x tile and the packed words
    (cp.async), plus one decoded weight tile on its way to the MMA operand layout."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return cfg["num_stages"] * (bm * bk * elt + bn * bk // 2) + bn * bk * elt


def keep_config(cfg: dict, m_bucket_: int, k: int, qblock: int, elt: int,
                smem_budget: int) -> bool:
    """Pruning rule of the autotune list:
    - BLOCK_M <= the M bucket (no tile mostly past M);
    - BLOCK_K <= 4 * QBLOCK (at most 4 absmax loads per row and step) and <= K rounded up;
    - the shared-memory estimate fits the device's budget."""
    return (cfg["BLOCK_M"] <= m_bucket_
            and cfg["BLOCK_K"] <= min(4 * qblock, max(32, triton.next_power_of_2(k)))
            and shared_bytes(cfg, elt) <= smem_budget)


def _tile(cfg: dict) -> tuple:
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["W_FIRST"], cfg["num_warps"],
            cfg["num_stages"])


_LARGE_M_TILES = {_tile(c) for c in SM90_LARGE_M_CONFIGS + SM80_LARGE_M_CONFIGS
                  + sibling_configs(SIBLING_FIXES, "_nf4_lora_fwd_kernel", "sm_100",
                                    SM80_LARGE_M_CONFIGS, False)}


def prefer_large_m(cfgs: list[dict], m_bucket_: int) -> list[dict]:
    """From an M bucket of LARGE_M on, only the LARGE_M_CONFIGS among `cfgs` (modelled
    ceilings 1.0 against <= 0.74 for the rest), when any is there; else `cfgs` unchanged."""
    if m_bucket_ < LARGE_M:
        return cfgs
    return [c for c in cfgs if _tile(c) in _LARGE_M_TILES] or cfgs


def prune_configs(configs, named_args, **kwargs):
    """triton.autotune early_config_prune over triton.Config objects: keep_config, then
    prefer_large_m. Keeps the smallest tile when nothing passes, so the autotuner always has a
    candidate."""
    x = named_args["x_ptr"]
    from triton.runtime import driver

    budget = driver.active.utils.get_device_properties(x.device.index)["max_shared_mem"]
    as_dict = {id(c): {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
               for c in configs}
    kept = [c for c in configs
            if keep_config(as_dict[id(c)], named_args["M_BUCKET"], named_args["K"],
                           kwargs["QBLOCK"], x.element_size(), budget)]
    chosen = prefer_large_m([as_dict[id(c)] for c in kept], named_args["M_BUCKET"])
    kept = [c for c in kept if any(as_dict[id(c)] is d for d in chosen)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def triton_configs(configs: list[dict]) -> list:
    """triton.Config objects of config dicts (the autotuner's input)."""
    return [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in configs]


# ----------------------------------------------------------------------------- compile specs

# Arguments that are multiples of 16 (pointers: 16-byte aligned) at a real launch, where Triton
# specialises on it; compiling without it would model unvectorised loads and spill.
ALIGNED_ARGS = ("x_ptr", "packed_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr",
                "code_ptr", "u_ptr", "b_ptr", "bias_ptr", "y_ptr", "a_ptr", "ws_ptr", "N", "K",
                "M_BUCKET", "k_per_split", "stride_xm", "stride_um", "stride_bn", "stride_ym",
                "stride_ar")
# contiguous last dims are 1 at a launch, which Triton specialises as a constant
UNIT_STRIDES = {"stride_xk": 1, "stride_ur": 1, "stride_br": 1, "stride_yn": 1}


def _fwd_spec(cfg, arch, dtype="bf16", k_aligned=True, rank=16, precision="tf32", qblock=64,
              target=0.0):
    sig = {"x_ptr": f"*{dtype}", **weight_signature(True), "u_ptr": f"*{dtype}",
           "b_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           **{n: "i32" for n in ("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_um",
                                 "stride_bn", "stride_ym")}, "scaling": "fp32"}
    blocks = {k: v for k, v in cfg.items() if not k.startswith("num_")}
    constexprs = {"QBLOCK": qblock, "DOUBLE_QUANT": True, "K_ALIGNED": k_aligned,
                  "LANE_TABLE": True, "HAS_BIAS": True,
                  "PRECISION": precision, "BLOCK_R": rank_block(rank), **blocks,
                  **UNIT_STRIDES}
    fma = dtype == "fp32" and precision == "ieee"
    return CompileSpec(kernel="_nf4_lora_fwd_kernel", fn=_nf4_lora_fwd_kernel, signature=sig,
                       constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"], archs=(arch,),
                       label=f"{dtype} k_aligned={int(k_aligned)} r={rank}{' ieee' * fma}"
                             f"{f' bs{qblock}' if qblock != 64 else ''}",
                       options={"enable_fp_fusion": False}, aligned=ALIGNED_ARGS, fma_dot=fma,
                       trip_flops=2 * blocks["BLOCK_M"] * blocks["BLOCK_N"] * blocks["BLOCK_K"],
                       trip_blocks=("BLOCK_M", "BLOCK_N", "BLOCK_K"), ceiling_target=target)


def _one_pass_spec(cfg, arch, dtype="bf16", rank=16):
    """The one-pass forward's spec: the tiled kernel's arguments plus lora_A. A trip's work is
    counted as the tiled kernel's (the base product's FLOPs), so its ceiling is the share of
    tensor-core peak left to the base product once U's product has taken its cut: the two
    forwards' ceilings compare directly (fastlora.bench.model.one_pass_pays)."""
    base = _fwd_spec(cfg, arch, dtype, True, rank)
    return dataclasses.replace(
        base, kernel="_nf4_lora_fwd_one_pass_kernel", fn=_nf4_lora_fwd_one_pass_kernel,
        signature={**base.signature, "a_ptr": f"*{dtype}", "stride_ar": "i32"},
        constexprs={**base.constexprs, "stride_ak": 1}, aligned=ALIGNED_ARGS)


# the mixed-batch tables (SEGMENTED; unread otherwise)
SEGMENT_SIGNATURE = {"row_seg_ptr": "*i32", "col_seg_ptr": "*i32", "col_scale_ptr": "*fp32",
                     "seg_thr_ptr": "*i32", "seg_keep_ptr": "*fp32"}


def _u_spec(rank, dtype, dropout, precision="tf32", target=0.0, segmented=False):
    cfg = _u_config(rank_block(rank), precision, dtype == "fp32")
    fma = dtype == "fp32" and precision == "ieee"
    sig = {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "u_ptr": f"*{dtype}",
           **{n: "i32" for n in ("M", "K", "R", "stride_xm", "stride_ar", "stride_um")},
           "seed_ptr": "*i64", "seed_hi": "i32", "threshold": "i64", "keep_scale": "fp32",
           **SEGMENT_SIGNATURE}
    constexprs = {"HAS_DROPOUT": dropout, "DROPOUT_GROUPED": True, "SEGMENTED": segmented,
                  "PRECISION": precision,
                  **{k: v for k, v in cfg.items() if k.startswith("BLOCK")},
                  "stride_xk": 1, "stride_ak": 1, "stride_ur": 1}
    return CompileSpec(kernel="_lora_u_kernel", fn=_lora_u_kernel, signature=sig,
                       constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"],
                       label=f"{dtype} dropout={int(dropout)}{' ieee' * fma}"
                             f"{' mixed' * segmented}",
                       aligned=ALIGNED_ARGS, fma_dot=fma,
                       trip_bytes=cfg["BLOCK_M"] * cfg["BLOCK_K"] * (4 if dtype == "fp32" else 2),
                       trip_blocks=("BLOCK_M", "BLOCK_K"), ceiling_target=target)


# The modelled tensor-core share a headline (LARGE_M) config must reach (issue 10), and the
# HBM share of the U kernel at r <= 64, 16-bit activations (issue 11).
HEADLINE_CEILING = 0.85
LORA_SIDE_CEILING = 0.75

COMPILE_SPECS = sibling_specs(SIBLING_FIXES, (
    [_fwd_spec(c, arch, dtype, True, r,
               target=HEADLINE_CEILING if c in large else 0.0)
     for arch, configs, large in (("sm_90", SM90_CONFIGS, SM90_LARGE_M_CONFIGS),
                                  ("sm_80", SM80_CONFIGS, SM80_LARGE_M_CONFIGS))
     for c in configs for r in (16, 64) for dtype in ("bf16", "fp16")
     if dtype == "bf16" or c in large]
    + [_fwd_spec(c, arch, dt, False) for arch, c in UNALIGNED_CONFIGS.items()
       for dt in ("bf16", "fp32")]
    + [_fwd_spec(c, arch, "fp32")
       for arch, configs in (("sm_90", SM90_FP32_CONFIGS), ("sm_80", SM80_FP32_CONFIGS))
       for c in configs]
    + [_u_spec(r, dt, True) for r in (128, 256) for dt in ("bf16", "fp32")]
    + [_u_spec(r, "fp32", True) for r in (16, 32, 64)]
    # issue 11: U at the ranks LoRA uses, with and without dropout, reads x at >= 0.75 of HBM
    + [_u_spec(r, dt, drop, target=LORA_SIDE_CEILING) for r in (16, 32, 64)
       for dt in ("bf16", "fp16") for drop in (True, False)]
    # fp32 at full precision: FMA dots, no tensor-core instruction (SM90_IEEE_CONFIGS)
    + [_fwd_spec(c, arch, "fp32", True, r, "ieee")
       for arch, configs in (("sm_90", SM90_IEEE_CONFIGS), ("sm_80", SM80_IEEE_CONFIGS))
       for c in configs for r in (16, 64)]
    + [_fwd_spec(c, arch, "fp32", False, precision="ieee")
       for arch, c in UNALIGNED_IEEE_CONFIGS.items()]
    + [_u_spec(r, "fp32", True, "ieee") for r in (16, 32, 64, 128, 256)]
    # issue 14: a mixed batch's U (4 or 16 adapters of rank 16 side by side), masked per row
    + [_u_spec(r, "bf16", drop, segmented=True) for r in (64, 256) for drop in (True, False)]
    # issue 30 part 4: the one-pass forward at the ranks LoRA uses (fp16 at r 16)
    + [_one_pass_spec(c, arch, dtype, r) for arch, configs in ONE_PASS_CONFIGS.items()
       for c in configs for r in (16, 32, 64) for dtype in ("bf16", "fp16")
       if dtype == "bf16" or r == 16]
    # blocksize 32 (bnb >= 0.49.2): a BLOCK_K of 64 or 128 decodes 2 or 4 absmax sub-blocks per
    # tile row in the vectorised path, more scale registers than at blocksize 64
    + [_fwd_spec(c, arch, dtype, True, 16, precision, qblock=32)
       for arch, dtype, precision, configs in (
           ("sm_90", "bf16", "tf32", SM90_CONFIGS), ("sm_80", "bf16", "tf32", SM80_CONFIGS),
           ("sm_90", "fp32", "tf32", SM90_FP32_CONFIGS),
           ("sm_80", "fp32", "tf32", SM80_FP32_CONFIGS),
           ("sm_90", "fp32", "ieee", SM90_IEEE_CONFIGS),
           ("sm_80", "fp32", "ieee", SM80_IEEE_CONFIGS))
       for c in configs if c["BLOCK_K"] > 32]
))
