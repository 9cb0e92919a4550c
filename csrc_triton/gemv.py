"""The forward at the fewest rows (M <= GEMV_MAX_M = 2: one or two tokens in generation) on
the CUDA cores, in ONE launch: y = x @ deq(W)^T + s * (x @ A^T) @ B^T + bias.

Why not tensor cores (small_m.py): at M <= 16 a layer is bound by reading its packed weight
(0.5 byte a value), and what limits the tensor-core kernel is not the MMA but moving each
decoded value into the MMA's operand layout through shared memory (2 x 2 B a value at 128 B per
clock, next to its shuffle: ~0.37 of HBM modelled). Here a tile row's 32 packed values (one
16-byte load) sit in one lane, which decodes and multiplies them itself: per value one shift
(word_nibbles), one warp shuffle (the register code table) and one FMA per row of x into the
row's sum over the block, scaled by the block's absmax once ((sum_k code[k] x[k]) * absmax, not
per value). Nothing goes through shared memory in the loop but the shuffles; the modelled HBM
share is ~0.8 at M = 1 and ~0.6 at M = 2 (compile report), where the tensor-core kernel stays
at ~0.37 for every M <= 16. Each row of x costs one more FMA a value, so from M = 3 on the
tensor-core kernel is as fast in the model and takes over.

U = x @ A^T is computed in the same programs (one launch a layer, issue 29): each program also
accumulates x[:, its K slice] @ A[:, its K slice]^T, R / BLOCK_N more multiply-adds than its
weight tile (A's rows come from L2), so every N tile has all of U from its own programs'
partials. Those partials and y's go to fp32 workspaces; the last program of a tile to arrive
(common.last_to_arrive) sums both in slice order, rounds U to x's dtype (as the U kernel
stores it), adds s * U @ B^T and the bias, and writes y. Every tile sums the same partials in
the same order, so all tiles use the same U, bit for bit; tile 0 also writes U when asked
(STORE_U: the autograd op saves it). No atomics on values: deterministic run to run.

The kernel is compiled with enable_fp_fusion=True (its FMAs). Double quantisation's absmax =
code2[q] * absmax2 + offset must stay two separately rounded fp32 operations (bitsandbytes'):
common.block_scales(ROUNDED=True) writes them as mul.rn / add.rn, which are never fused.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (CompileSpec, SiblingFix, block_scales, code_lookup, lane_table,
                     last_to_arrive, sibling_configs, sibling_specs, weight_signature,
                     word_nibbles)

GEMV_MAX_M = 2  # the most rows this path serves (tests/test_gemv.py; launch/forward.py)
R_CHUNK = tl.constexpr(16)  # rank columns the epilogue's s * U @ B^T takes at a time


@triton.jit
def _nf4_lora_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                          code_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, ws_ptr, wsu_ptr,
                          counter_ptr, M, N, K, K_WORDS, R, k_per_split, stride_xm, stride_xk,
                          stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
                          stride_um, stride_ur, scaling,
                          QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, LANE_TABLE: tl.constexpr):
    """Program (n, s): N tile n, K slice s = [s * k_per_split, + k_per_split) of y's and U's
    sums, for the M <= BLOCK_M (1 or 2) rows of x.

    x_ptr [M, K], a_ptr [R, K] (lora_A), b_ptr [N, R] (lora_B), bias_ptr [N], y_ptr [M, N],
    u_ptr [M, R] (STORE_U): x's dtype; weight pointers as in common.py, K % QBLOCK == 0,
    K_WORDS = K // 8 and the packed bytes 4-byte aligned. ws_ptr fp32 [n_slices, M, N]
    (SPLIT; unread otherwise); wsu_ptr fp32 [n_tiles, n_slices, BLOCK_M, BLOCK_R], each
    program's partial U; counter_ptr int32 [n_tiles] zeros (SPLIT). k_per_split is a multiple
    of BLOCK_K, so slices start on tile boundaries.

    Each row of x has its own [BLOCK_N] accumulator (no [M, N, K] product is formed: a 2-D
    [BLOCK_N, BLOCK_K] tile keeps each weight row's 32 values in one lane, so every sum over
    k is in-thread)."""
    tl.static_assert(BLOCK_K == 32, "one 16-byte vector of packed values a row and trip")
    tl.static_assert(QBLOCK >= BLOCK_K, "bitsandbytes' blocksizes are 32 .. 4096")
    tl.static_assert(BLOCK_M == 1 or BLOCK_M == 2, "1 or 2 rows")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_slices = tl.num_programs(1)
    table = lane_table(code_ptr, LANE_TABLE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    word_ptrs = (packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                 + (rows * K_WORDS)[:, None] + tl.arange(0, BLOCK_K // 8)[None, :])
    a_ptrs = a_ptr + offs_r[:, None] * stride_ar + tl.arange(0, BLOCK_K)[None, :] * stride_ak
    a_ok = (offs_r < R)[:, None]
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u0 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    u1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        # K % QBLOCK == 0, k0 a multiple of 32: the tile row is one block's, inside K
        words = tl.load(word_ptrs + k0 // 8, mask=n_ok[:, None], other=0)
        code = tl.reshape(code_lookup(table, word_nibbles(words), LANE_TABLE),
                          (BLOCK_N, BLOCK_K))  # a row's 32 values in one lane
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             (rows * K + k0) // QBLOCK, n_ok, DOUBLE_QUANT, LANE_TABLE)
        a = tl.load(a_ptrs + k0 * stride_ak, mask=a_ok, other=0.0).to(tl.float32)
        # each row's sum_k code[k] x[k] over the block's values in-thread, then its absmax once
        acc0, u0 = _row_step(acc0, u0, code, scale, a, x_ptr, 0, k0, M, stride_xk, BLOCK_K)
        if BLOCK_M > 1:
            acc1, u1 = _row_step(acc1, u1, code, scale, a, x_ptr + stride_xm, 1, k0, M,
                                 stride_xk, BLOCK_K)
    # this program's partial U, read back in R_CHUNK-wide columns by the tile's last program
    part_u = wsu_ptr + (pid_n * n_slices + pid_k).to(tl.int64) * (BLOCK_M * BLOCK_R) + offs_r
    tl.store(part_u, u0)
    if BLOCK_M > 1:
        tl.store(part_u + BLOCK_R, u1)
    if SPLIT:
        ws_row = ws_ptr + pid_k.to(tl.int64) * M * N + offs_n
        tl.store(ws_row, acc0, mask=n_ok)
        if BLOCK_M > 1:
            tl.store(ws_row + N, acc1, mask=n_ok & (offs_n * 0 + 1 < M))
        if last_to_arrive(counter_ptr + pid_n, n_slices):
            for m in tl.static_range(BLOCK_M):
                acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
                ws_row = ws_ptr + m * N + rows
                for _ in range(0, n_slices):  # slice order
                    acc += tl.load(ws_row, mask=n_ok & (offs_n * 0 + m < M), other=0.0,
                                   cache_modifier=".cg")
                    ws_row += M * N  # M <= 2: no overflow before N passes 2^30
                _finish_row(acc, m, pid_n, n_slices, offs_n, M, N, R, b_ptr, bias_ptr, y_ptr,
                            u_ptr, wsu_ptr, stride_bn, stride_br, stride_ym, stride_yn,
                            stride_um, stride_ur, scaling, HAS_BIAS, STORE_U, BLOCK_M, BLOCK_R)
    else:
        tl.debug_barrier()  # the partial U above, stored by every thread, read back below
        for m in tl.static_range(BLOCK_M):
            acc = acc0
            if m == 1:
                acc = acc1
            _finish_row(acc, m, pid_n, 1, offs_n, M, N, R, b_ptr, bias_ptr, y_ptr, u_ptr,
                        wsu_ptr, stride_bn, stride_br, stride_ym, stride_yn, stride_um,
                        stride_ur, scaling, HAS_BIAS, STORE_U, BLOCK_M, BLOCK_R)


@triton.jit
def _row_step(acc, u, code, scale, a, x_row_ptr, m, k0, M, stride_xk, BLOCK_K: tl.constexpr):
    """One trip for row m of x (x_row_ptr: its first element): acc [BLOCK_N] += (code @ x_m)
    * scale, u [BLOCK_R] += a @ x_m, x_m = x[m, k0 : k0 + BLOCK_K] (0 when m >= M; the
    columns lie inside K: K % 32 == 0)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_row_ptr + offs_k.to(tl.int64) * stride_xk,
                mask=tl.full((BLOCK_K,), m, tl.int32) < M, other=0.0).to(tl.float32)
    return (acc + tl.sum(code * x[None, :], axis=1) * scale,
            u + tl.sum(a * x[None, :], axis=1))


@triton.jit
def _finish_row(acc, m: tl.constexpr, pid_n, n_slices, offs_n, M, N, R, b_ptr, bias_ptr, y_ptr,
                u_ptr, wsu_ptr, stride_bn, stride_br, stride_ym, stride_yn, stride_um,
                stride_ur, scaling, HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row m of the y tile = acc + s * U[m] @ B^T + bias, U[m] the sum of the tile's n_slices
    partial U's (slice order), rounded to y's dtype; tile 0 also stores U[m] (STORE_U)."""
    n_ok = offs_n < N
    lora = tl.zeros((offs_n.shape[0],), dtype=tl.float32)
    first = wsu_ptr + (pid_n * n_slices).to(tl.int64) * (BLOCK_M * BLOCK_R) + m * BLOCK_R
    for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < R
        parts = first + offs_r
        u = tl.zeros((R_CHUNK,), dtype=tl.float32)
        for _ in range(0, n_slices):  # slice order
            u += tl.load(parts, cache_modifier=".cg")
            parts += BLOCK_M * BLOCK_R
        u = u.to(y_ptr.dtype.element_ty)
        if STORE_U:
            tl.store(u_ptr + m * stride_um + offs_r.to(tl.int64) * stride_ur, u,
                     mask=r_ok & (offs_r * 0 + m < M) & (offs_r * 0 + pid_n == 0))
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
                    + offs_r[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        lora += tl.sum(b.to(tl.float32) * u.to(tl.float32)[None, :], axis=1)
    y = acc + lora * scaling
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n.to(tl.int64) * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=n_ok & (offs_n * 0 + m < M))


# ----------------------------------------------------------------------------- configs

BLOCK_K = 32  # the kernel's tile width (one 16-byte load of packed values a row)
# compile options of every build of the kernel, shipped spec and launch alike: its FMAs (the
# double-quant absmax stays two roundings: block_scales ROUNDED)
OPTIONS = {"enable_fp_fusion": True}
# Interpreter: small tiles and two K slices keep test shapes at a handful of programs and still
# run the split-K sums (y's and U's).
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": BLOCK_K, "SPLIT_K": 2, "num_warps": 4,
                      "num_stages": 1}
# K slices of at least MIN_TRIPS tiles: a program's fixed costs (its partial sums' stores, the
# arrival) stay small next to its loop
MIN_TRIPS = 8


def _cfg(bn, warps, stages=3):
    return {"BLOCK_N": bn, "BLOCK_K": BLOCK_K, "num_warps": warps, "num_stages": stages}


def block_m(m: int) -> int:
    """The kernel's BLOCK_M for m rows: 1 or 2."""
    if not 0 < m <= GEMV_MAX_M:
        raise ValueError(f"the CUDA-core forward serves 1..{GEMV_MAX_M} rows, got {m}")
    return 1 if m == 1 else 2


# Autotune lists per (BLOCK_M, wide), wide = padded rank >= 64 or fp32 activations (more
# registers: U's partial sums, fp32 x rows), chosen with the hot-loop model (compile report:
# modelled HBM share of the packed bytes, sm_80 / sm_90, bf16): 512 rows on 4 warps (4 rows a
# lane) at M = 1 0.80 / 0.77 at r = 16, 0.76 / 0.74 at r = 64 (fp32 0.68 / 0.66); at M = 2
# 0.65 / 0.62 at r = 16. 256 rows on 4 warps (2 rows a lane): N too narrow for 512, and M = 2
# when wide, 0.50 / 0.49 at r = 64. Dropped after measuring (spills, bytes): 1024 rows on 4
# warps (16-48 at r = 64, 672-728 in fp32); 1024 on 8 warps (8 at M = 1, r = 16 unsplit on
# sm_90; 40-72 at M = 2, r = 64); 512 on 4 warps at M = 2 when wide (24-64); and M = 4 (at best
# 0.37-0.38, the tensor-core kernel's figure, and spilling).
GEMV_CONFIGS = {(1, False): [_cfg(512, 4), _cfg(256, 4)], (1, True): [_cfg(512, 4), _cfg(256, 4)],
                (2, False): [_cfg(512, 4), _cfg(256, 4)], (2, True): [_cfg(256, 4)]}
SMALLEST_BLOCK_N = min(c["BLOCK_N"] for cs in GEMV_CONFIGS.values() for c in cs)
# The modelled HBM share gated on the first config of each bf16 / fp16 list
# (tests/test_compile.py HEADLINE): at M = 1 a floor under 512 x 4's 0.74 (r = 64, sm_90),
# short of issue 29's 0.75 there (a warp shuffle a value, and the U product's share of the
# loop; 0.77 at r = 16); at M = 2 each value's second FMA and the narrower tile when wide leave
# 0.49-0.65.
HBM_FLOOR = {1: 0.70, 2: 0.45}

# On sm_100 (B200; Triton 3.9) 4 warps spill 8 B at 512 rows (16-bit, M = 1, r = 16, no split)
# and at 256 rows in fp32 (M = 2, r = 16, no split): 8 warps hold both (80 / 102 registers).
_KERNEL = "_nf4_lora_gemv_kernel"
SIBLING_FIXES = (
    SiblingFix(_KERNEL, ("sm_100",), {"BLOCK_N": 512, "num_warps": 4}, {"num_warps": 8},
               fp32=False),
    SiblingFix(_KERNEL, ("sm_100",), {"BLOCK_N": 256, "num_warps": 4}, {"num_warps": 8},
               fp32=True),
)


def gemv_configs(bm: int, block_r: int, fp32: bool, arch: str = "sm_80") -> list[dict]:
    """The autotune list for BLOCK_M bm, padded rank block_r, fp32 activations or not, as
    compile target `arch` runs it (sm_80's siblings take SIBLING_FIXES)."""
    return sibling_configs(SIBLING_FIXES, _KERNEL, arch, GEMV_CONFIGS[bm, block_r >= 64 or fp32],
                           fp32)


def split_k(n: int, k: int, num_sms: int) -> int:
    """How many K slices for an N of n: ~4 programs per SM at the narrowest tile, each slice at
    least MIN_TRIPS tiles long."""
    programs_n = triton.cdiv(n, 512)
    return max(1, min(triton.cdiv(4 * num_sms, programs_n), k // (MIN_TRIPS * BLOCK_K)))


def _spec(cfg, dtype, bm, split, rank=16, target=0.0):
    from .forward import ALIGNED_ARGS, rank_block

    sig = {"x_ptr": f"*{dtype}", **weight_signature(True), "a_ptr": f"*{dtype}",
           "b_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           "u_ptr": f"*{dtype}", "ws_ptr": "*fp32", "wsu_ptr": "*fp32", "counter_ptr": "*i32",
           **{n: "i32" for n in ("M", "N", "K", "K_WORDS", "R", "k_per_split", "stride_xm",
                                 "stride_ar", "stride_bn", "stride_ym", "stride_um")},
           "scaling": "fp32"}
    constexprs = {"QBLOCK": 64, "DOUBLE_QUANT": True, "HAS_BIAS": True, "STORE_U": True,
                  "SPLIT": split, "BLOCK_M": bm, "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_K": cfg["BLOCK_K"], "BLOCK_R": rank_block(rank), "LANE_TABLE": True,
                  "stride_xk": 1, "stride_ak": 1, "stride_br": 1, "stride_yn": 1,
                  "stride_ur": 1}
    return CompileSpec(kernel="_nf4_lora_gemv_kernel", fn=_nf4_lora_gemv_kernel,
                       signature=sig, constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"], uses_dot=False,
                       label=f"{dtype} m={bm} r={rank} split={int(split)}",
                       options=OPTIONS,
                       aligned=ALIGNED_ARGS + ("wsu_ptr", "K_WORDS"),
                       trip_bytes=cfg["BLOCK_N"] * cfg["BLOCK_K"] // 2,  # the packed weight
                       trip_blocks=("BLOCK_N", "BLOCK_K"), ceiling_target=target)


COMPILE_SPECS = sibling_specs(SIBLING_FIXES, (
    [_spec(c, dt, bm, split, r, target=HBM_FLOOR[bm] if i == 0 else 0.0)
     for bm in (1, 2) for r in (16, 64) for i, c in enumerate(gemv_configs(bm, r, False))
     for dt in ("bf16", "fp16") for split in (True, False) if dt == "bf16" or i == 0]
    + [_spec(c, "fp32", bm, split, r) for bm in (1, 2) for r in (16, 64)
       for c in gemv_configs(bm, r, True) for split in (True, False)]
))
