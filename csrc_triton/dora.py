"""QDoRA's kernels: what a DoRA layer over a 4-bit base adds to the plain LoRA ones.

PEFT's DoRA layer (peft/tuners/lora/dora.py, bnb.py; m the magnitude [N], n its row norms):

    n   = || W + s * B @ A ||_row   (detached from the graph)      mns = m / n
    p=0 y = mns * (x @ W^T + s * x @ A^T @ B^T) + bias
    p>0 y = x @ W^T + bias + (mns - 1) * (xd @ W^T) + mns * s * xd @ A^T @ B^T,  xd = dropout(x)

fastlora/ops/dora.py runs it on the plain layer's GEMM kernels (forward.py, small_m.py,
backward.py: a per-row scale of W is a scale of its absmax, so diag(c) @ W is read packed like
W) plus these five, none of which materialises W or B @ A:

    _dora_norm_kernel     n^2 [N] fp32 partials: one pass over the packed weight; each
                          [BLOCK_N, BLOCK_K] tile is decoded in fp32, B_tile @ A_tile added
                          from tensor cores, and the squares summed per row (memory-bound:
                          0.5 B of weight a value), split over K
    _dropout_kernel       dropout(t) for a [M, K] t with the Philox draws of every other kernel
                          (common.dropout_keep: the mask is a function of the seed, never kept)
    _dora_scales_kernel   the norms' square roots, mns = m / n, the absmax of diag(c) @ W and
                          diag(mns) @ B (and in backward the magnitude's gradient from the
                          column dot's parts), for a block of rows in one launch
    _dora_combine_kernel  out = base + bias + c[n] * z, in fp32, rounded once
    _col_dot_kernel       per-column sum over rows of g * z (the magnitude's gradient), split
                          over M, fp32 partials added in a fixed order by the scales kernel
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (CompileSpec, block_scales, decode_tile, dropout_keep, dropout_seed,
                     lane_table, weight_signature)

# _dora_norm_kernel: [64, 64] tiles, 4 warps, split over K to fill the GPU (the launcher aims
# at two waves). Swept on sm_90 (bf16, r = 16 / 64; no config spills): [16, 128] 0.16 / 0.08
# of HBM, [32, 128] 0.20 / 0.11, [64, 64] 0.28 / 0.21, [64, 128] w8 0.27 / 0.20. The elementwise
# work a value needs (decode, + s * BA, mask, square-add, the MMA result's layout change) is
# above the ~4.6 lane-instructions a value HBM allows; README.md ("DoRA over 4-bit bases")
# says the route past it. Shipped = the interpreter's config.
NORM_BLOCK_N = 64
NORM_BLOCK_K = 64
NORM_NUM_WARPS = 4
# _dora_scales_kernel: 32 rows a program, their absmax 64 blocks and B 64 ranks at a time
SCALES_BLOCK_N = 32
SCALES_BLOCK_Q = 64
SCALES_BLOCK_R = 64
# the elementwise kernels: [32, 128] tiles, 4 warps (8 values a thread: one 16-byte access)
EW_BLOCK_M = 32
EW_BLOCK_N = 128
EW_NUM_WARPS = 4
# _col_dot_kernel: [16, 128] steps (two tiles' 64-bit addresses a value: at 32 rows Triton
# 3.5 / 3.6 took 255 registers and 3.6 spilled 16 B on sm_80; 16 rows: 150-190, no spill)
COL_BLOCK_M = 16


@triton.jit
def _dora_norm_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                      a_ptr, b_ptr, ws_ptr, N, K, R, k_per_split, stride_ar, stride_ak,
                      stride_bn, stride_br, scaling,
                      QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      K_ALIGNED: tl.constexpr, LANE_TABLE: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """ws[split, n] = sum over k in [split * k_per_split, +k_per_split) of
    (deq(W)[n, k] + scaling * (B @ A)[n, k])^2 for BLOCK_N rows (the launcher adds the splits
    in order and takes the square root; k_per_split is a multiple of BLOCK_K).

    a_ptr [R, K], b_ptr [N, R] in the compute dtype (16-bit, or fp32 at PRECISION); W decoded
    in fp32 (code * absmax, not rounded to the compute dtype); B @ A with an fp32 accumulator;
    squares summed in fp32. BLOCK_R: R padded to a power of two >= 16 (zeros past R)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    table = lane_table(code_ptr, LANE_TABLE)
    b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * k_per_split
    for k0 in range(first, tl.minimum(first + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED,
                        LANE_TABLE)
        v = w + scaling * tl.dot(b, a, input_precision=PRECISION)
        # decode_tile leaves a finite junk value past K with double quant: masked, as are the
        # rows past N (never stored)
        v = tl.where((offs_k < K)[None, :], v, 0.0)
        acc += tl.sum(v * v, axis=1)
    tl.store(ws_ptr + split.to(tl.int64) * N + offs_n, acc, mask=n_ok)


@triton.jit
def _dora_scales_kernel(ws_ptr, mag_ptr, mns_ptr, norm_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                        offset_ptr, b_ptr, absmax_out_ptr, b_out_ptr, dm_ws_ptr, dm_ptr, N, R,
                        splits, dm_splits, per_row, stride_bn, stride_br, shift, tiny,
                        FROM_WS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        WRITE_ABSMAX: tl.constexpr, WRITE_B: tl.constexpr,
                        WRITE_DM: tl.constexpr, DM_OVER_MNS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """The DoRA layer's per-row scales, for BLOCK_N rows, in one launch:

    FROM_WS   norm[n] = sqrt(sum over splits of ws[split, n]) (the norm kernel's partials, in
              order) and mns[n] = mag[n] / norm[n] (`tiny` where that is 0; tiny = 0 keeps 0),
              both stored (fp32); else mns is read from mns_ptr.
    WRITE_ABSMAX  absmax_out[n * per_row + q] = absmax[n * per_row + q] * (mns[n] + shift)
              (fp32; absmax decoded as every kernel does, common.block_scales): the absmax of
              diag(mns + shift) @ W, each row holding per_row whole quantisation blocks.
    WRITE_B   b_out[n, :] = mns[n] * b[n, :] (fp32 product, rounded once to b_out's dtype).
    WRITE_DM  (backward, from mns) the magnitude's gradient: dm[n] = (sum over dm_splits of
              dm_ws[split, n], in order) / norm[n], also / mns[n] when DM_OVER_MNS (the
              column dot was taken against y = mns * z), rounded once to dm's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)  # the [splits, N] parts: 64-bit offsets
    n_ok = offs_n < N
    if FROM_WS:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for split in range(0, splits):
            acc += tl.load(ws_ptr + split * N + offs_n64, mask=n_ok, other=0.0)
        norm = tl.sqrt(acc)
        # rows past N divide by 1, not 0 / 0 (never stored either way)
        mns = (tl.load(mag_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
               / tl.where(n_ok, norm, 1.0))
        mns = tl.where(mns == 0.0, tiny, mns)
        tl.store(norm_ptr + offs_n, norm, mask=n_ok)
        tl.store(mns_ptr + offs_n, mns, mask=n_ok)
    else:
        mns = tl.load(mns_ptr + offs_n, mask=n_ok, other=0.0)
    if WRITE_DM:
        col = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for split in range(0, dm_splits):
            col += tl.load(dm_ws_ptr + split * N + offs_n64, mask=n_ok, other=0.0)
        denom = tl.load(norm_ptr + offs_n, mask=n_ok, other=1.0)
        if DM_OVER_MNS:
            denom = denom * mns
        denom = tl.where(n_ok, denom, 1.0)  # rows past N (never stored): no 0 / 0
        tl.store(dm_ptr + offs_n, (col / denom).to(dm_ptr.dtype.element_ty), mask=n_ok)
    if WRITE_B:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            mask = n_ok[:, None] & (r0 + offs_r < R)[None, :]
            rows = offs_n.to(tl.int64)[:, None] * stride_bn + (r0 + offs_r)[None, :] * stride_br
            b = tl.load(b_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            tl.store(b_out_ptr + offs_n.to(tl.int64)[:, None] * R + (r0 + offs_r)[None, :],
                     (mns[:, None] * b).to(b_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_ABSMAX:
        c = mns + shift
        offs_q = tl.arange(0, BLOCK_Q)
        for q0 in range(0, per_row, BLOCK_Q):
            mask = n_ok[:, None] & (q0 + offs_q < per_row)[None, :]
            idx = offs_n.to(tl.int64)[:, None] * per_row + (q0 + offs_q)[None, :]
            scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask,
                                 DOUBLE_QUANT)
            tl.store(absmax_out_ptr + idx, scale * c[:, None], mask=mask)


@triton.jit
def _dropout_kernel(t_ptr, out_ptr, M, K, stride_tm, stride_tk, stride_om, stride_ok,
                    seed_ptr, seed_hi, threshold, keep_scale, GROUPED: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out = dropout(t) for t [M, K]: element (m, k) kept (times keep_scale = 1 / (1 - p), in
    fp32, rounded once) when its draw at offset m * K + k passes `threshold`
    (common.dropout_keep; GROUPED: K % 8 == 0)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_k.to(tl.int64)[None, :]
    t = tl.load(t_ptr + rows * stride_tm + cols * stride_tk, mask=mask, other=0.0)
    keep = dropout_keep(dropout_seed(seed_ptr, seed_hi), offs_m, k0, K, threshold, BLOCK_M,
                        BLOCK_K, GROUPED)
    out = tl.where(keep, t.to(tl.float32) * keep_scale, 0.0)
    tl.store(out_ptr + rows * stride_om + cols * stride_ok, out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dora_combine_kernel(z_ptr, base_ptr, c_ptr, bias_ptr, out_ptr, M, N, stride_zm,
                         stride_zn, stride_basem, stride_basen, stride_om, stride_on, shift,
                         HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = base[m, n] + bias[n] + (c[n] + shift) * z[m, n] (base, bias: when present)
    in fp32, rounded once to out's dtype. c_ptr fp32 [N]; bias_ptr [N]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=mask, other=0.0)
    c = tl.load(c_ptr + offs_n, mask=n_ok, other=0.0) + shift
    out = c[None, :] * z.to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + rows * stride_basem + cols * stride_basen, mask=mask,
                       other=0.0)
        out += base.to(tl.float32)
    tl.store(out_ptr + rows * stride_om + cols * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _col_dot_kernel(g_ptr, z_ptr, ws_ptr, M, N, rows_per_split, stride_gm, stride_gn,
                    stride_zm, stride_zn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """ws[split, n] = sum over rows [split * rows_per_split, +rows_per_split) of
    g[m, n] * z[m, n], products and sum in fp32 (rows_per_split: a multiple of BLOCK_M)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = offs_n < N
    cols = offs_n.to(tl.int64)[None, :]
    first = split * rows_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(first, tl.minimum(first + rows_per_split, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & n_ok[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows * stride_gm + cols * stride_gn, mask=mask, other=0.0)
        z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * z.to(tl.float32), axis=0)
    tl.store(ws_ptr + split.to(tl.int64) * N + offs_n, acc, mask=n_ok)


def rank_block(rank: int) -> int:
    """_dora_norm_kernel's BLOCK_R: the rank padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(rank))


# ----------------------------------------------------------------------------- compile specs
# [N]-sized vectors (norm, c, bias) stay far below 2^31 elements: 32-bit offsets address them.
_BOUNDED = ("code_ptr", "code2_ptr", "offset_ptr", "absmax2_ptr", "a_ptr", "b_ptr",
            "c_ptr", "bias_ptr", "seed_ptr")
_ALIGNED = ("K", "N", "stride_ar", "stride_bn", "stride_tm", "stride_om", "stride_zm",
            "stride_basem", "stride_gm")


def _norm_spec(act: str, double_quant: bool, rank: int) -> CompileSpec:
    return CompileSpec(
        kernel="_dora_norm_kernel", fn=_dora_norm_kernel,
        signature={**weight_signature(double_quant), "a_ptr": f"*{act}", "b_ptr": f"*{act}",
                   "ws_ptr": "*fp32", "N": "i32", "K": "i32", "R": "i32", "k_per_split": "i32",
                   "stride_ar": "i32",
                   "stride_ak": "i32", "stride_bn": "i32", "stride_br": "i32",
                   "scaling": "fp32"},
        constexprs={"QBLOCK": 64, "DOUBLE_QUANT": double_quant, "K_ALIGNED": True,
                    "LANE_TABLE": True, "PRECISION": "tf32", "BLOCK_N": NORM_BLOCK_N,
                    "BLOCK_K": NORM_BLOCK_K, "BLOCK_R": rank_block(rank)},
        num_warps=NORM_NUM_WARPS, num_stages=2, label=f"{act} r={rank} dq={int(double_quant)}",
        options={"enable_fp_fusion": False}, aligned=_ALIGNED, bounded_args=_BOUNDED,
        # a trip reads the tile's packed bytes (A's tile stays in L2: every program reads it)
        trip_bytes=NORM_BLOCK_N * NORM_BLOCK_K // 2)


def _scales_spec(act: str, double_quant: bool, from_ws: bool) -> CompileSpec:
    return CompileSpec(
        kernel="_dora_scales_kernel", fn=_dora_scales_kernel,
        signature={"ws_ptr": "*fp32", "mag_ptr": "*fp32", "mns_ptr": "*fp32",
                   "norm_ptr": "*fp32", **{k: v for k, v in weight_signature(double_quant).items()
                                           if k not in ("packed_ptr", "code_ptr")},
                   "b_ptr": f"*{act}", "absmax_out_ptr": "*fp32", "b_out_ptr": f"*{act}",
                   "dm_ws_ptr": "*fp32", "dm_ptr": "*fp32", "N": "i32", "R": "i32",
                   "splits": "i32", "dm_splits": "i32", "per_row": "i32",
                   "stride_bn": "i32", "stride_br": "i32", "shift": "fp32", "tiny": "fp32"},
        constexprs={"FROM_WS": from_ws, "DOUBLE_QUANT": double_quant, "WRITE_ABSMAX": True,
                    "WRITE_B": True, "WRITE_DM": not from_ws, "DM_OVER_MNS": True,
                    "BLOCK_N": SCALES_BLOCK_N, "BLOCK_Q": SCALES_BLOCK_Q,
                    "BLOCK_R": SCALES_BLOCK_R},
        num_warps=EW_NUM_WARPS, num_stages=1, uses_dot=False,
        label=f"{act} dq={int(double_quant)} {'forward' if from_ws else 'backward'}",
        options={"enable_fp_fusion": False}, aligned=_ALIGNED,
        bounded_args=_BOUNDED + ("mag_ptr", "mns_ptr", "norm_ptr", "dm_ptr"),
        # a trip of its absmax loop: one uint8 (fp32 without double quant) in, one fp32 out,
        # per block
        trip_bytes=SCALES_BLOCK_N * SCALES_BLOCK_Q * ((1 if double_quant else 4) + 4))


def _dropout_spec(act: str) -> CompileSpec:
    elt = 2 if act != "fp32" else 4
    return CompileSpec(
        kernel="_dropout_kernel", fn=_dropout_kernel,
        signature={"t_ptr": f"*{act}", "out_ptr": f"*{act}", "M": "i32", "K": "i32",
                   "stride_tm": "i32", "stride_tk": "i32", "stride_om": "i32",
                   "stride_ok": "i32", "seed_ptr": "*i64", "seed_hi": "i32", "threshold": "i64",
                   "keep_scale": "fp32"},
        constexprs={"GROUPED": True, "BLOCK_M": EW_BLOCK_M, "BLOCK_K": EW_BLOCK_N},
        num_warps=EW_NUM_WARPS, num_stages=1, uses_dot=False, label=act, aligned=_ALIGNED,
        bounded_args=_BOUNDED, trip_bytes=2 * EW_BLOCK_M * EW_BLOCK_N * elt)


def _combine_spec(act: str) -> CompileSpec:
    elt = 2 if act != "fp32" else 4
    return CompileSpec(
        kernel="_dora_combine_kernel", fn=_dora_combine_kernel,
        signature={"z_ptr": f"*{act}", "base_ptr": f"*{act}", "c_ptr": "*fp32",
                   "bias_ptr": f"*{act}", "out_ptr": f"*{act}", "M": "i32", "N": "i32",
                   "stride_zm": "i32", "stride_zn": "i32", "stride_basem": "i32",
                   "stride_basen": "i32", "stride_om": "i32", "stride_on": "i32",
                   "shift": "fp32"},
        constexprs={"HAS_BASE": True, "HAS_BIAS": True, "BLOCK_M": EW_BLOCK_M,
                    "BLOCK_N": EW_BLOCK_N},
        num_warps=EW_NUM_WARPS, num_stages=1, uses_dot=False, label=act, aligned=_ALIGNED,
        bounded_args=_BOUNDED, trip_bytes=3 * EW_BLOCK_M * EW_BLOCK_N * elt)


def _col_dot_spec(act: str) -> CompileSpec:
    elt = 2 if act != "fp32" else 4
    return CompileSpec(
        kernel="_col_dot_kernel", fn=_col_dot_kernel,
        signature={"g_ptr": f"*{act}", "z_ptr": f"*{act}", "ws_ptr": "*fp32", "M": "i32",
                   "N": "i32", "rows_per_split": "i32", "stride_gm": "i32", "stride_gn": "i32",
                   "stride_zm": "i32", "stride_zn": "i32"},
        constexprs={"BLOCK_M": COL_BLOCK_M, "BLOCK_N": EW_BLOCK_N},
        num_warps=EW_NUM_WARPS, num_stages=2, uses_dot=False, label=act, aligned=_ALIGNED,
        bounded_args=_BOUNDED, trip_bytes=2 * COL_BLOCK_M * EW_BLOCK_N * elt)


COMPILE_SPECS = (
    [_norm_spec(act, dq, rank) for act in ("bf16",) for dq in (True, False)
     for rank in (16, 64)]
    + [_scales_spec("bf16", dq, from_ws) for dq in (True, False) for from_ws in (True, False)]
    + [spec(act) for spec in (_dropout_spec, _combine_spec, _col_dot_spec)
       for act in ("bf16", "fp32")]
)
