"""Kernels of the grouped op (fastlora.ops.group): G <= MAX_MEMBERS LoRA layers that read the
same input x (q/k/v, gate/up), each with its own A [r_g, K], rank, dropout p and seed.

    _lora_u_group_kernel      U_g = dropout_g(x) @ A_g^T for every member, one pass over x
    _lora_bwd_da_group_kernel dA_g = dU_g^T @ dropout_g(x) (fp32 partials per row split,
                              summed in split order by a column tile's last program) for
                              every member, and dx := sum_g dropout_g'(dU_g @ A_g), one pass
                              over x, dx's LoRA term written once for the whole group

Member g's dropout mask is drawn exactly as the single-layer kernels draw it with that member's
seed (common.dropout_keep at offset m * K + k), so a group computes what its members' separate
ops compute, and fastlora.reference reproduces every mask bit for bit.

Members sit in slots 0..G-1 (constexpr G); a slot's arguments are its A (contiguous [R, K]),
its U or dU (contiguous [M, R]), its dA workspace and dA, R, its dropout seed (a pointer to
the int64 [1] seed on the device and its high word: common.dropout_seed), 16-bit
threshold and 1 / (1 - p), and constexprs HAS_DROPOUTg and R_PADg (the rank padded to a power
of two >= 16). Slots past G are compiled out; the launcher fills them with slot 0's values.

Registers: the accumulators of all members are live at once, plus one member's mask at a time;
u_config / da_config pick by the summed padded rank, and COMPILE_SPECS compiles the headline
groups (q/k/v at r = 16 and 32, gate/up at 16 and 64) for sm_80 and sm_90.

Cost model. The group reads x once where its members' kernels read it G times, but it draws G
masks per element, as they do: with dropout the U and dA steps are bound by instruction issue
(Philox), so the group's modelled time is about the members' summed time (its ceiling on the x
bytes is about 1/G of one member's); without dropout they are memory-bound, and the group moves
1/G of the x bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (CompileSpec, SUM_ROWS, SiblingFix, by_triton, dropout_keep,
                     dropout_seed, last_to_arrive, load_x_tile, sibling_config, sibling_specs,
                     sum_parts)

MAX_MEMBERS = 4
# The summed padded rank a group may have. At 256 (q/k/v at r = 64) with dropout, the modelled
# U and dA group kernels (0.25 and 0.22 of HBM on x's bytes, sm_90 bf16) are slower than their
# three members' kernels (0.89 and 0.99 each); up to 128 they are no slower (COMPILE_SPECS).
MAX_TOTAL_R_PAD = 128
# fp32 at full precision ('ieee': FMA dots) up to 64 only: from 128 on, every config tried
# spilled (8 B to 6 KB) on one Triton release 3.5-3.9 or another, for one member count or another
MAX_TOTAL_R_PAD_IEEE = 64


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _u_member(acc, x, a_ptr, offs_m, k0, K, R, seed, threshold, keep_scale,
              HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, R_PAD] += dropout(x tile) @ A^T tile, A contiguous [R, K]."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_M, BLOCK_K,
                            DROPOUT_GROUPED)
        # fp32 elementwise: the interpreter's bf16 arithmetic is wrong (DESIGN.md)
        x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)
    a_t = tl.load(a_ptr + offs_k.to(tl.int64)[:, None] + offs_r[None, :] * K,
                  mask=(offs_k < K)[:, None] & (offs_r < R)[None, :], other=0.0)
    return tl.dot(x, a_t, acc, input_precision=PRECISION)


@triton.jit
def _store_rows(acc, out_ptr, offs_m, M, R, R_PAD: tl.constexpr):
    """out [M, R] (contiguous) = acc [BLOCK_M, R_PAD] rows offs_m, in out's dtype."""
    offs_r = tl.arange(0, R_PAD)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_r < R)[None, :])


@triton.jit
def _da_member(acc, x, du_ptr, a, offs_m, m_mask, k0, K, R, seed, threshold, keep_scale,
               COMPUTE_DA: tl.constexpr, WRITE_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               DROPOUT_GROUPED: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One member's step over a [BLOCK_M, BLOCK_K] tile of x: acc (dA^T [BLOCK_K, R_PAD])
    += dropout(x)^T @ dU rows (COMPUTE_DA); returns (acc, dropout'(dU rows @ A tile)) in fp32.
    a: the member's [R_PAD, BLOCK_K] tile of A (zero past R)."""
    offs_r = tl.arange(0, R_PAD)
    du = tl.load(du_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :],
                 mask=m_mask[:, None] & (offs_r < R)[None, :], other=0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_M, BLOCK_K,
                            DROPOUT_GROUPED)
    if COMPUTE_DA:
        xd = x
        if HAS_DROPOUT:
            xd = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)
        acc = tl.dot(tl.trans(xd), du, acc, input_precision=DOT_PRECISION)
    if WRITE_DX:
        term = tl.dot(du, a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            term = tl.where(keep, term * keep_scale, 0.0)
    else:
        term = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # unused: dx is not asked for
    return acc, term


@triton.jit
def _a_tile(a_ptr, offs_k, K, R, R_PAD: tl.constexpr):
    offs_r = tl.arange(0, R_PAD)
    return tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                   mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _store_da(acc, ws_ptr, pid_s, offs_k, K, R, R_PAD: tl.constexpr):
    """ws [S, R, K] fp32: ws[pid_s] = acc^T (acc: dA^T [BLOCK_K, R_PAD])."""
    offs_r = tl.arange(0, R_PAD)
    ws = ws_ptr + (pid_s.to(tl.int64) * R + offs_r[None, :]) * K + offs_k[:, None]
    tl.store(ws, acc, mask=(offs_k < K)[:, None] & (offs_r < R)[None, :])


@triton.jit
def _sum_da(ws_ptr, da_ptr, parts, k0, K, R, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA [R, K] (contiguous) columns [k0, k0 + BLOCK_K) = the sum of ws [parts, R, K] in part
    order, SUM_ROWS columns at a time."""
    offs_r = tl.arange(0, R_PAD)
    for c0 in range(k0, k0 + BLOCK_K, SUM_ROWS):
        offs_k = c0 + tl.arange(0, SUM_ROWS)
        at = offs_r.to(tl.int64)[None, :] * K + offs_k[:, None]
        sum_parts(ws_ptr + at, da_ptr + at, R * K, parts, 1.0,
                  (offs_k < K)[:, None] & (offs_r < R)[None, :])


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _lora_u_group_kernel(x_ptr, M, K, stride_xm, stride_xk,
                         a0_ptr, u0_ptr, R0, seed0_ptr, seed_hi0, threshold0, keep_scale0,
                         a1_ptr, u1_ptr, R1, seed1_ptr, seed_hi1, threshold1, keep_scale1,
                         a2_ptr, u2_ptr, R2, seed2_ptr, seed_hi2, threshold2, keep_scale2,
                         a3_ptr, u3_ptr, R3, seed3_ptr, seed_hi3, threshold3, keep_scale3,
                         G: tl.constexpr, HAS_DROPOUT0: tl.constexpr,
                         HAS_DROPOUT1: tl.constexpr, HAS_DROPOUT2: tl.constexpr,
                         HAS_DROPOUT3: tl.constexpr, R_PAD0: tl.constexpr,
                         R_PAD1: tl.constexpr, R_PAD2: tl.constexpr, R_PAD3: tl.constexpr,
                         DROPOUT_GROUPED: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """U_g [M, R_g] = dropout_g(x) @ A_g^T for g < G, one program per BLOCK_M rows: each x tile
    is loaded once and feeds every member's dot. x [M, K] (any strides), A_g, U_g in x's dtype;
    the masked tile is rounded to x's dtype before the dot, as forward._lora_u_kernel does."""
    tl.static_assert(G >= 1 and G <= 4, "a group has 1..4 members")
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    acc0 = tl.zeros((BLOCK_M, R_PAD0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, R_PAD1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, R_PAD2), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, R_PAD3), dtype=tl.float32)
    # each member's seed (common.dropout_seed); unread slots are compiled out
    seed0, seed1 = dropout_seed(seed0_ptr, seed_hi0), dropout_seed(seed1_ptr, seed_hi1)
    seed2, seed3 = dropout_seed(seed2_ptr, seed_hi2), dropout_seed(seed3_ptr, seed_hi3)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        acc0 = _u_member(acc0, x, a0_ptr, offs_m, k0, K, R0, seed0, threshold0,
                         keep_scale0, HAS_DROPOUT0, DROPOUT_GROUPED, PRECISION, BLOCK_M, R_PAD0,
                         BLOCK_K)
        if G > 1:
            acc1 = _u_member(acc1, x, a1_ptr, offs_m, k0, K, R1, seed1, threshold1,
                             keep_scale1, HAS_DROPOUT1, DROPOUT_GROUPED, PRECISION, BLOCK_M,
                             R_PAD1, BLOCK_K)
        if G > 2:
            acc2 = _u_member(acc2, x, a2_ptr, offs_m, k0, K, R2, seed2, threshold2,
                             keep_scale2, HAS_DROPOUT2, DROPOUT_GROUPED, PRECISION, BLOCK_M,
                             R_PAD2, BLOCK_K)
        if G > 3:
            acc3 = _u_member(acc3, x, a3_ptr, offs_m, k0, K, R3, seed3, threshold3,
                             keep_scale3, HAS_DROPOUT3, DROPOUT_GROUPED, PRECISION, BLOCK_M,
                             R_PAD3, BLOCK_K)
    _store_rows(acc0, u0_ptr, offs_m, M, R0, R_PAD0)
    if G > 1:
        _store_rows(acc1, u1_ptr, offs_m, M, R1, R_PAD1)
    if G > 2:
        _store_rows(acc2, u2_ptr, offs_m, M, R2, R_PAD2)
    if G > 3:
        _store_rows(acc3, u3_ptr, offs_m, M, R3, R_PAD3)


@triton.jit
def _lora_bwd_da_group_kernel(x_ptr, dx_ptr, counter_ptr, M, K, rows_per_split, stride_xm,
                              stride_xk, stride_dxm, stride_dxk,
                              du0_ptr, a0_ptr, ws0_ptr, da0_ptr, R0, seed0_ptr, seed_hi0,
                              threshold0, keep_scale0,
                              du1_ptr, a1_ptr, ws1_ptr, da1_ptr, R1, seed1_ptr, seed_hi1,
                              threshold1, keep_scale1,
                              du2_ptr, a2_ptr, ws2_ptr, da2_ptr, R2, seed2_ptr, seed_hi2,
                              threshold2, keep_scale2,
                              du3_ptr, a3_ptr, ws3_ptr, da3_ptr, R3, seed3_ptr, seed_hi3,
                              threshold3, keep_scale3,
                              G: tl.constexpr, COMPUTE_DA: tl.constexpr,
                              WRITE_DX: tl.constexpr, HAS_DROPOUT0: tl.constexpr,
                              HAS_DROPOUT1: tl.constexpr, HAS_DROPOUT2: tl.constexpr,
                              HAS_DROPOUT3: tl.constexpr, R_PAD0: tl.constexpr,
                              R_PAD1: tl.constexpr, R_PAD2: tl.constexpr,
                              R_PAD3: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """For one column tile and one row split: every member's fp32 dA partial
    (ws_g[split] = dU_g[rows]^T @ dropout_g(x)[rows], COMPUTE_DA) and dx's LoRA term
    sum_g dropout_g'(dU_g @ A_g), summed in fp32 and written once in x's dtype (WRITE_DX; the
    dx GEMMs then take it as their accumulator's initial value). dU_g [M, R_g] (scaled by s_g),
    A_g [R_g, K] contiguous, in x's dtype; x, dx any strides. The last of a column tile's
    programs to arrive at counter_ptr[tile] (int32 [column tiles], zero; common.last_to_arrive)
    adds every member's partials in split order into dA_g [R_g, K] (contiguous, A_g's dtype)."""
    tl.static_assert(G >= 1 and G <= 4, "a group has 1..4 members")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K >= 16, "tl.dot needs every dimension >= 16")
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    cols = offs_k.to(tl.int64)
    a0 = _a_tile(a0_ptr, offs_k, K, R0, R_PAD0)
    a1 = _a_tile(a1_ptr, offs_k, K, R1, R_PAD1)
    a2 = _a_tile(a2_ptr, offs_k, K, R2, R_PAD2)
    a3 = _a_tile(a3_ptr, offs_k, K, R3, R_PAD3)
    acc0 = tl.zeros((BLOCK_K, R_PAD0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, R_PAD1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, R_PAD2), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, R_PAD3), dtype=tl.float32)
    # each member's seed (common.dropout_seed); unread slots are compiled out
    seed0, seed1 = dropout_seed(seed0_ptr, seed_hi0), dropout_seed(seed1_ptr, seed_hi1)
    seed2, seed3 = dropout_seed(seed2_ptr, seed_hi2), dropout_seed(seed3_ptr, seed_hi3)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        tile_mask = m_mask[:, None] & k_mask[None, :]
        x = tl.zeros((BLOCK_M, BLOCK_K), dtype=act)
        if COMPUTE_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=tile_mask, other=0.0)
        acc0, lora = _da_member(acc0, x, du0_ptr, a0, offs_m, m_mask, k0, K, R0, seed0,
                                threshold0, keep_scale0, COMPUTE_DA, WRITE_DX, HAS_DROPOUT0,
                                DROPOUT_GROUPED, DOT_PRECISION, BLOCK_M, R_PAD0, BLOCK_K)
        if G > 1:
            acc1, term = _da_member(acc1, x, du1_ptr, a1, offs_m, m_mask, k0, K, R1, seed1,
                                    threshold1, keep_scale1, COMPUTE_DA, WRITE_DX, HAS_DROPOUT1,
                                    DROPOUT_GROUPED, DOT_PRECISION, BLOCK_M, R_PAD1, BLOCK_K)
            lora += term
        if G > 2:
            acc2, term = _da_member(acc2, x, du2_ptr, a2, offs_m, m_mask, k0, K, R2, seed2,
                                    threshold2, keep_scale2, COMPUTE_DA, WRITE_DX, HAS_DROPOUT2,
                                    DROPOUT_GROUPED, DOT_PRECISION, BLOCK_M, R_PAD2, BLOCK_K)
            lora += term
        if G > 3:
            acc3, term = _da_member(acc3, x, du3_ptr, a3, offs_m, m_mask, k0, K, R3, seed3,
                                    threshold3, keep_scale3, COMPUTE_DA, WRITE_DX, HAS_DROPOUT3,
                                    DROPOUT_GROUPED, DOT_PRECISION, BLOCK_M, R_PAD3, BLOCK_K)
            lora += term
        if WRITE_DX:
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     lora.to(act), mask=tile_mask)
    if COMPUTE_DA:
        _store_da(acc0, ws0_ptr, pid_s, offs_k, K, R0, R_PAD0)
        if G > 1:
            _store_da(acc1, ws1_ptr, pid_s, offs_k, K, R1, R_PAD1)
        if G > 2:
            _store_da(acc2, ws2_ptr, pid_s, offs_k, K, R2, R_PAD2)
        if G > 3:
            _store_da(acc3, ws3_ptr, pid_s, offs_k, K, R3, R_PAD3)
        num_splits = tl.num_programs(1)
        if last_to_arrive(counter_ptr + pid_k, num_splits):
            _sum_da(ws0_ptr, da0_ptr, num_splits, k0, K, R0, R_PAD0, BLOCK_K)
            if G > 1:
                _sum_da(ws1_ptr, da1_ptr, num_splits, k0, K, R1, R_PAD1, BLOCK_K)
            if G > 2:
                _sum_da(ws2_ptr, da2_ptr, num_splits, k0, K, R2, R_PAD2, BLOCK_K)
            if G > 3:
                _sum_da(ws3_ptr, da3_ptr, num_splits, k0, K, R3, R_PAD3, BLOCK_K)


# ----------------------------------------------------------------------------- compile specs

def r_pad(rank: int) -> int:
    """A member's padded rank: a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rank))


def total_r_pad(ranks) -> int:
    """The padded rank whose single-layer config a group of these ranks runs with."""
    return triton.next_power_of_2(sum(r_pad(r) for r in ranks))


# Configs. All accumulators of a group are live at once and each member draws its own mask,
# so a group wants fewer rows per program than one layer of the same summed rank. Picked from a
# search over 5-7 candidates per (total padded rank, activation class), compiled for sm_90 and
# sm_80 with dropout on every member (Triton 3.9; registers sm_90 / sm_80, worst member count):
# U   16-bit / tf32: 64x32 w4 s3 up to 128 (152 / 196), 32x64 w4 s3 at 256 (192 / 188); the
#     64x64 tiles the single kernel uses reach 220-255 registers here and spill 8-320 B at 256.
#     ieee (up to 64, MAX_TOTAL_R_PAD_IEEE): 64x32 w8 s3 (122 / 80).
# dA  16-bit / tf32: 16x64 w4 s2 up to 64 (172 / 168) and for 16-bit at 128 (172 / 168),
#     16x32 w4 s2 for fp32 at 128 (139 / 139) and at 256 (190 / 189); 64x64 w4 (the single
#     kernel's headline) spills 8-592 B from 3 members on. ieee: 16x64 w8 s1 (109 / 80).
# Also spill-free on Triton 3.5-3.8 (.ci/support-range compiles COMPILE_SPECS under each).
def _check_ieee(total: int) -> None:
    if total > MAX_TOTAL_R_PAD_IEEE:
        raise ValueError(f"fp32 groups at full precision serve padded ranks summing to at most "
                         f"{MAX_TOTAL_R_PAD_IEEE}, got {total}")


# On sm_80's siblings (common.SM80_SIBLINGS; Triton 3.9): U at full precision spills 8 B on
# sm_86 / sm_89 at 16+16+16 with 3 stages (1 stage: 108 registers); U 64x32 w4 spills 8 B on
# sm_120 at 32+32+32 without dropout (8 warps: 96 registers); dA 16x64 w4 s2 (16-bit) spills
# 8 B on sm_86 / sm_89 at 16+16+16 with dropout (1 stage: 168 registers, up to a summed 96;
# 1 stage spills 8 B at 64+64 without dropout, where 2 stages hold).
# Since the dropout seed comes from the device (issue 30; one more live register), Triton 3.9:
# the full-precision U group tile also takes 32 rows on sm_86 / sm_89 (64 at 1 stage: 8 B
# spilled), the full-precision dA group tile BLOCK_K 32 there (16 B at 64), and the 16-bit dA
# group tile 8 warps on sm_120 (16 B at 4 warps, 32+32+32). On sm_100 the dA group tile 16x64
# w4 s2 spills 8-16 B (16-bit 16+16 without dropout, fp32 16+16+16 with): 1 stage holds them
# (40-96 registers), up to a summed 96 as on sm_86 / sm_89.
SIBLING_FIXES = (
    SiblingFix("_lora_bwd_da_group_kernel", ("sm_100",),
               {"BLOCK_M": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
               {"num_stages": 1}, max_rank=96),
    SiblingFix("_lora_u_group_kernel", ("sm_86", "sm_89"),
               {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
               {"num_stages": 1, "BLOCK_M": 32}, ieee=True),
    SiblingFix("_lora_u_group_kernel", ("sm_120",),
               {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4}, {"num_warps": 8}, ieee=False),
    SiblingFix("_lora_bwd_da_group_kernel", ("sm_86", "sm_89"),
               {"BLOCK_M": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
               {"num_stages": 1}, fp32=False, max_rank=96),
    SiblingFix("_lora_bwd_da_group_kernel", ("sm_86", "sm_89"),
               {"BLOCK_M": 16, "BLOCK_K": 64, "num_warps": 8, "num_stages": 1},
               {"BLOCK_K": 32}, ieee=True),
    SiblingFix("_lora_bwd_da_group_kernel", ("sm_120",),
               {"BLOCK_M": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
               {"num_warps": 8}, fp32=False),
)


def u_config(ranks, precision: str = "tf32", fp32: bool = False, arch: str = "sm_80") -> dict:
    """The U group kernel's config (BLOCK_M, BLOCK_K, num_warps, num_stages) for these ranks
    on compile target `arch` (sm_80's siblings take SIBLING_FIXES)."""
    cfg = _u_config(ranks, precision, fp32)
    return sibling_config(SIBLING_FIXES, "_lora_u_group_kernel", arch, cfg, fp32,
                          fp32 and precision == "ieee", total_r_pad(ranks))


def _u_config(ranks, precision: str = "tf32", fp32: bool = False) -> dict:
    total = total_r_pad(ranks)
    if fp32 and precision == "ieee":
        _check_ieee(total)
        return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    if total <= 128:
        return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def da_config(ranks, fp32: bool, precision: str, arch: str = "sm_80") -> triton.Config:
    """The dA group kernel's config for these ranks on compile target `arch` (the same on
    sm_80 and sm_90; sm_80's siblings take SIBLING_FIXES)."""
    cfg = _da_config(ranks, fp32, precision)
    return sibling_config(SIBLING_FIXES, "_lora_bwd_da_group_kernel", arch, cfg, fp32,
                          fp32 and precision == "ieee", total_r_pad(ranks))


def _da_config(ranks, fp32: bool, precision: str) -> triton.Config:
    total = total_r_pad(ranks)
    if fp32 and precision == "ieee":
        _check_ieee(total)
        # Triton 3.6, 3.7: 16x64 w8 s1 spills 8 B on sm_80 at 16+16+16, and 16x32 w4 s1
        # (shipped for them before) 8 B on sm_80 at 16+16 (caught by CI's support-range
        # rotation); 16x16 w8 s1 is spill-free there at every served total (16+16, 16+16+16,
        # 32+32, 32+16+16, 16+16+16+16) on both archs (60-128 registers)
        block_k, warps = by_triton((64, 8), **dict.fromkeys(("v3_6", "v3_7"), (16, 8)))
        return triton.Config({"BLOCK_M": 16, "BLOCK_K": block_k}, num_warps=warps,
                             num_stages=1)
    wide = total > 128 or (fp32 and total > 64)
    # Triton 3.5: 16x64 w4 s2 spills 8 B on sm_80 at 16+16+16 and 32+32+32 (16-bit, dropout)
    # since the dA sum moved in-kernel; 8 warps are spill-free there (114-181 registers)
    if not wide:
        warps = by_triton(4, v3_5=8)
    elif fp32 and len(ranks) == 2:
        # Triton 3.8: fp32 at 64+64 (16x32 w4 s2) spills 8 B on sm_90; w8 holds it (95 / 126),
        # while w8 spills at 32+32+32 (8-24 B), which w4 holds: 8 warps for two members only
        warps = by_triton(4, v3_8=8)
    else:
        warps = 4
    return triton.Config({"BLOCK_M": 16, "BLOCK_K": 32 if wide else 64}, num_warps=warps,
                         num_stages=2)


# Arguments a real launch specialises as multiples of 16: the tensors (fresh allocations and
# parameters), model extents and the x / dx row strides.
ALIGNED_ARGS = ("x_ptr", "dx_ptr", "M", "K", "stride_xm", "stride_dxm",
                *(f"{name}{g}_ptr" for g in range(MAX_MEMBERS)
                  for name in ("a", "u", "du", "ws", "da")),
                *(f"R{g}" for g in range(MAX_MEMBERS)))
# lora_A [r <= 256, K < 2^23] and the one-element seed of every slot and the arrival counters:
# 32-bit offsets address them (common.BOUNDED_ARGS)
BOUNDED_ARGS = (*(f"{name}{g}_ptr" for g in range(MAX_MEMBERS) for name in ("a", "seed")),
                "counter_ptr")


def _slots(ranks, dropout, pointers):
    """The per-slot signature entries and constexprs of a group of `ranks` (slots past the
    group repeat slot 0, as the launcher passes them)."""
    sig, consts = {}, {"G": len(ranks)}
    for g in range(MAX_MEMBERS):
        sig.update({f"{name}{g}_ptr": kind for name, kind in pointers})
        sig.update({f"R{g}": "i32", f"seed{g}_ptr": "*i64", f"seed_hi{g}": "i32",
                    f"threshold{g}": "i64",
                    f"keep_scale{g}": "fp32"})
        rank = ranks[g] if g < len(ranks) else ranks[0]
        consts.update({f"HAS_DROPOUT{g}": dropout, f"R_PAD{g}": r_pad(rank)})
    return sig, consts


def _u_group_spec(ranks, arch, act, precision="tf32", target=0.0, dropout=True, cfg=None):
    fp32 = act == "fp32"
    cfg = cfg or _u_config(ranks, precision, fp32)
    sig, consts = _slots(ranks, dropout, (("a", f"*{act}"), ("u", f"*{act}")))
    sig = {"x_ptr": f"*{act}", "M": "i32", "K": "i32", "stride_xm": "i32", **sig}
    fma = fp32 and precision == "ieee"
    return CompileSpec(kernel="_lora_u_group_kernel", fn=_lora_u_group_kernel, signature=sig,
                       constexprs={**consts, "stride_xk": 1, "DROPOUT_GROUPED": True,
                                   "PRECISION": precision, "BLOCK_M": cfg["BLOCK_M"],
                                   "BLOCK_K": cfg["BLOCK_K"]},
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], archs=(arch,),
                       label=f"{act} ranks={'+'.join(map(str, ranks))} dropout={int(dropout)}"
                             f"{' ieee' * fma}",
                       aligned=ALIGNED_ARGS, bounded_args=BOUNDED_ARGS, fma_dot=fma,
                       trip_bytes=cfg["BLOCK_M"] * cfg["BLOCK_K"] * (4 if fp32 else 2),
                       trip_blocks=("BLOCK_M", "BLOCK_K"), ceiling_target=target)


def _da_group_spec(ranks, arch, act, precision="tf32", target=0.0, dropout=True, cfg=None):
    fp32 = act == "fp32"
    precision = precision if fp32 else "ieee"  # 16-bit operands ignore it
    cfg = cfg or _da_config(ranks, fp32, precision)
    sig, consts = _slots(ranks, dropout, (("du", f"*{act}"), ("a", f"*{act}"), ("ws", "*fp32"),
                                          ("da", f"*{act}")))
    sig = {"x_ptr": f"*{act}", "dx_ptr": f"*{act}", "counter_ptr": "*i32", "M": "i32", "K": "i32",
           "rows_per_split": "i32", "stride_xm": "i32", "stride_dxm": "i32", **sig}
    fma = fp32 and precision == "ieee"
    elt = 4 if fp32 else 2
    return CompileSpec(kernel="_lora_bwd_da_group_kernel", fn=_lora_bwd_da_group_kernel,
                       signature=sig,
                       constexprs={**consts, "stride_xk": 1, "stride_dxk": 1,
                                   "COMPUTE_DA": True, "WRITE_DX": True,
                                   "DROPOUT_GROUPED": True, "DOT_PRECISION": precision,
                                   **cfg.kwargs},
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, archs=(arch,),
                       label=f"{act} ranks={'+'.join(map(str, ranks))} dropout={int(dropout)}"
                             f"{' ieee' * fma}",
                       aligned=ALIGNED_ARGS, bounded_args=BOUNDED_ARGS, fma_dot=fma,
                       trip_bytes=2 * cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"] * elt,
                       trip_blocks=("BLOCK_M", "BLOCK_K"), ceiling_target=target)


# The groups of a Llama decoder layer: q/k/v (3 members) and gate/up (2) at r = 16, q/k/v at
# 32 and gate/up at 64 (the largest served), for each activation class and arch (fp32 'ieee'
# up to its limit): with dropout on every member (the worst case for registers), and 16-bit
# without dropout (the memory-bound case).
HEADLINE_GROUPS = ((16, 16, 16), (16, 16), (32, 32, 32), (64, 64))
COMPILE_SPECS = sibling_specs(SIBLING_FIXES, (
    [spec(ranks, arch, act, precision)
     for spec in (_u_group_spec, _da_group_spec)
     for arch in ("sm_90", "sm_80") for ranks in HEADLINE_GROUPS
     for act, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"),
                            ("fp32", "ieee"))
     if precision != "ieee" or total_r_pad(ranks) <= MAX_TOTAL_R_PAD_IEEE]
    + [spec(ranks, arch, "bf16", dropout=False)
       for spec in (_u_group_spec, _da_group_spec)
       for arch in ("sm_90", "sm_80") for ranks in HEADLINE_GROUPS]
))
