"""Backward of the QLoRA layer (DESIGN.md, "The math"): three kernels, three launches, run in
this order (each needs the one before):

    _lora_bwd_du_db_kernel   dU = s * dy @ B  and  dB = s * dy^T @ U, one pass over dy
    _lora_bwd_da_kernel      dA = dU^T @ dropout(x), one pass over x, the dropout mask
                             regenerated from the forward's seed; where dx's LoRA term is not
                             the dx GEMM's (below) also dx := dropout'(dU @ A) (WRITE_DX);
                             where the GEMM applies the mask, the mask as bits (WRITE_BITS)
    _nf4_lora_bwd_dx_kernel  dx = dropout'(dU @ A) + dy @ deq(W) (LORA), or dx += dy @ deq(W);
                             W read packed and decoded tile by tile: no [N, K] buffer.

A group of layers reading one x (csrc_triton/group.py; launch/group.py) runs its members' dU
and dB in one launch, _lora_bwd_du_db_group_kernel (the members' column groups side by side,
each program du_db's program for its member), and its members' dx products in one launch,
_nf4_lora_bwd_dx_group_kernel: the dx kernel's loop over N once per member, on that member's
dy and packed weight, into one accumulator; dx written once.

Where dx's LoRA term is made (issue 30): for 16-bit activations with K % blocksize == 0, the
dx GEMM makes dU @ A before its loop over N, over the rank in chunks of LORA_CHUNK, as its
accumulator's initial value, and writes dx once: backward activation traffic 2 MN (dy, twice)
+ 2 MK (x read, dx written). With dropout it does so where DROPOUT_BITS_TARGETS says: the dA
kernel, which draws the mask anyway, stores it as bits (MK / 8 bytes) and the GEMM's prologue
applies them (+ MK / 8 in 16-bit activation units: written once, read once). Otherwise the dA
kernel writes the term and the GEMM reads it back as its initial value: 2 MK more (one write,
one read), and the term is rounded to the activation dtype once before the sum (plain PyTorch
rounds both terms). Why not everywhere: compiled, the mask next to sm_90's 128-register wgmma
accumulator spills (104 B drawn by Philox in the prologue, 120 B loaded as bits, at its
headline 256 x 64 x 128 tile), as does sm_80's headline with the bits on Triton 3.5 / 3.6
(224-280 B; drawn by Philox 56-128 B on 3.9); the K-unaligned decode with the LoRA prologue
took stack at two small tiles, as did fp32 tiles (8-568 B, mostly the 'ieee' FMA ones, on
Triton 3.5-3.8); those routes stay on the dA kernel's write, as do a group's summed term, a
mixed batch's per-row dropout and dequantize + cuBLAS's. A mixed batch without dropout takes
the GEMM's route too (its dU is masked per row, so the term is dU @ A).

Determinism: dB and dA are sums over M. Rather than atomics (whose order varies run to run),
M is cut into a fixed number of splits; each program writes its split's fp32 partial to a
workspace it alone owns, and the last program of a tile to finish (common.last_to_arrive, one
int32 counter per tile) adds the partials in split order (common.sum_parts) inside the same
launch. dU, a sum over N, is cut into column groups the same way, so that one pass over dy
fills the GPU at every shape. Same inputs and same config: bit-identical gradients (the
arrival order only decides WHICH program sums, never the order of the sum).

Orientation: the dx kernel accumulates dx^T tiles [BLOCK_K, BLOCK_M] = deq(W)^T @ dy^T, so the
decoded weight tile (made in registers) is tl.dot's FIRST operand; on sm_90 wgmma takes it from
registers (SASS `HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR8]`), dy from shared memory
(DESIGN.md, "Compilation"). The weight tile comes from common.decode_tile, the decoder the
forward uses too: vectorised bytes and one scale per row and block when K % QBLOCK == 0, else
common.decode_weight per element (blocks straddling rows, odd K).

Precision: elementwise math in fp32 (the interpreter computes bf16 elementwise math on bit
patterns); tl.dot takes operands in the activation dtype and accumulates in fp32; fp32
activations use DOT_PRECISION ("tf32" or "ieee": the launcher follows
torch.backends.cuda.matmul.allow_tf32). Row offsets are int64: M * stride passes 2^31 at
M * K > 2^31 (512k tokens x 4096).

Configs: CONFIGS[kernel][arch, fp32] is what the GPU autotunes over (pruned by
`prune_configs`), IEEE_CONFIGS[kernel][arch] instead for fp32 at DOT_PRECISION "ieee"
(`config_list` picks), INTERPRETER_CONFIGS the one fixed config of Triton's CPU interpreter,
COMPILE_SPECS every shipped config x arch for fastlora.compile_report().
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (BOUNDED_ARGS, SM80_SIBLINGS, CompileSpec, SiblingFix, by_triton, decode_tile,
                     dropout_keep, dropout_seed, grouped_tile,
                     lane_table, last_to_arrive, row_dropout, segment_factor, segment_of_rows,
                     SUM_ROWS, sibling_configs, sibling_specs, sum_parts)

MAX_R_PAD = 256  # the rank is padded to a power of two R_PAD in [16, 256]
# the dx GEMM's LoRA term runs over the rank in chunks this wide (tl.dot's least K): its
# operand tiles stay small next to the GEMM's at any rank
LORA_CHUNK = tl.constexpr(16)


# The in-kernel sums run in functions of their own (noinline: a call in the PTX), so that
# the register allocator sizes the main loop apart from them. Inlined, the tail's atomic and
# loop alone (nothing of it live in the main loop) made ptxas spill 8-56 B in configs at
# ~255 registers that fit without it (da 64x64 w4 s3 at R_PAD 64 on sm_80: 8 B).
@triton.jit(noinline=True)
def _finish_rows(ws_ptr, out_ptr, counter_ptr, parts, part_stride, row_start, row_end, R,
                 scale, R_PAD: tl.constexpr):
    """The last of `parts` programs to arrive at counter_ptr writes out [rows, R] (contiguous,
    rows [row_start, row_end)) = scale * the sum of the fp32 partials ws + j * part_stride
    (each [rows, R] contiguous too), j in order."""
    offs_r = tl.arange(0, R_PAD)
    if last_to_arrive(counter_ptr, parts):
        for m0 in range(row_start, row_end, SUM_ROWS):
            rows = (m0 + tl.arange(0, SUM_ROWS)).to(tl.int64)
            at = rows[:, None] * R + offs_r[None, :]
            sum_parts(ws_ptr + at, out_ptr + at, part_stride, parts, scale,
                      (rows < row_end)[:, None] & (offs_r < R)[None, :])


@triton.jit(noinline=True)
def _finish_cols(ws_ptr, out_ptr, counter_ptr, parts, k0, K, R, R_PAD: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The last of `parts` programs to arrive at counter_ptr writes out[:, k0:k0 + BLOCK_K] of
    out [R, K] (contiguous) = the sum of the fp32 partials ws [parts, R, K], in order."""
    offs_r = tl.arange(0, R_PAD)
    if last_to_arrive(counter_ptr, parts):
        for c0 in range(k0, k0 + BLOCK_K, SUM_ROWS):
            cols = c0 + tl.arange(0, SUM_ROWS)
            at = offs_r[None, :].to(tl.int64) * K + cols[:, None]
            sum_parts(ws_ptr + at, out_ptr + at, R * K, parts, 1.0,
                      (cols < K)[:, None] & (offs_r < R)[None, :])


@triton.jit
def _du_db_program(pid_s, pid_g, dy_ptr, u_ptr, b_ptr, ws_du_ptr, ws_db_ptr, du_ptr, db_ptr,
                   counter_ptr, M, N, R, rows_per_split, cols_per_group, scaling, stride_dym,
                   stride_dyn, stride_um, stride_ur, stride_bn, stride_br, row_seg_ptr,
                   col_seg_ptr, col_scale_ptr, COMPUTE_DU: tl.constexpr,
                   COMPUTE_DB: tl.constexpr, SEGMENTED: tl.constexpr, R_PAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row split pid_s, column group pid_g) of one layer's dU / dB
    (_lora_bwd_du_db_kernel's docstring says the arguments): counter_ptr holds the layer's
    S + G arrival counters."""
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    col_start = pid_g * cols_per_group
    col_end = tl.minimum(col_start + cols_per_group, N)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        if COMPUTE_DB:
            u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < col_end
            # int64 columns: a column-major dy has stride_dyn = M, and n * M can pass 2^31
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym
                         + offs_n.to(tl.int64)[None, :] * stride_dyn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            if COMPUTE_DU:
                b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                            mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                du = tl.dot(dy, b, du, input_precision=DOT_PRECISION)
            if COMPUTE_DB:
                part = tl.dot(tl.trans(dy), u, input_precision=DOT_PRECISION)
                ws = (ws_db_ptr + (pid_s.to(tl.int64) * N + offs_n[:, None]) * R
                      + offs_r[None, :])
                tile_mask = n_mask[:, None] & r_mask[None, :]
                later = tl.full((1, 1), m0, tl.int32) > row_start  # not the first row block
                prev = tl.load(ws, mask=tile_mask & later, other=0.0)
                tl.store(ws, prev + part, mask=tile_mask)
        if COMPUTE_DU:
            if SEGMENTED:
                du = du * segment_factor(segment_of_rows(row_seg_ptr, offs_m, M), col_seg_ptr,
                                         col_scale_ptr, offs_r, R)
            ws = ws_du_ptr + (pid_g.to(tl.int64) * M + rows[:, None]) * R + offs_r[None, :]
            tl.store(ws, du, mask=m_mask[:, None] & r_mask[None, :])
    num_splits = tl.cdiv(M, rows_per_split)
    num_groups = tl.cdiv(N, cols_per_group)
    if COMPUTE_DU:  # dU rows of split s: the G column groups' partials
        _finish_rows(ws_du_ptr, du_ptr, counter_ptr + pid_s, num_groups, M * R, row_start,
                     row_end, R, scaling, R_PAD)
    if COMPUTE_DB:  # dB columns of group g: the S row splits' partials
        _finish_rows(ws_db_ptr, db_ptr, counter_ptr + num_splits + pid_g, num_splits, N * R,
                     col_start, col_end, R, scaling, R_PAD)


@triton.jit
def _lora_bwd_du_db_kernel(dy_ptr, u_ptr, b_ptr, ws_du_ptr, ws_db_ptr, du_ptr, db_ptr,
                           counter_ptr, M, N, R, rows_per_split, cols_per_group, m_bucket,
                           scaling,
                           stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br,
                           row_seg_ptr, col_seg_ptr, col_scale_ptr,
                           COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr,
                           SEGMENTED: tl.constexpr,
                           R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dU = s * dy @ B and dB = s * dy^T @ U, over a grid of (row split, column group) programs.

    dy_ptr  fp16/bf16/fp32 [M, N]      u_ptr [M, R], b_ptr [N, R], both in dy's dtype
    ws_du_ptr fp32 [G, M, R]  ws_du[g] = dy[:, cols of group g] @ B[cols of group g]
    ws_db_ptr fp32 [S, N, R]  ws_db[s] = dy[rows of split s]^T @ U[rows of split s]
    du_ptr [M, R] in dy's dtype, db_ptr [N, R] in B's dtype (contiguous): the results
    counter_ptr int32 [S + G], zero: arrivals per row split (dU), then per column group (dB)
    Program (s, g) walks its rows block by block (outer) and its columns (inner): the dU tile
    stays in registers across the inner loop; the dB tile of each column block is added into
    ws_db[s], which only this program touches, in row order (first row block: plain store).
    Then the last of split s's G programs to finish adds ws_du[0..G-1] over the split's rows
    into dU, and the last of group g's S programs adds ws_db[0..S-1] over the group's columns
    into dB (common.last_to_arrive, common.sum_parts: fixed order, so deterministic; no
    reduction launch). m_bucket: unused here, part of the autotune key.
    SEGMENTED (a mixed batch, fastlora/launch/mixed.py): B holds several adapters side by side
    and ws_du[g][m, r] is kept (times col_scale[r]) only where column r is row m's adapter's
    (csrc_triton.common.segment_factor; row_seg_ptr int32 [M], col_seg_ptr int32 [R],
    col_scale_ptr fp32 [R]); U arrives already masked and scaled, so dB needs nothing more.
    """
    tl.static_assert(R_PAD >= 16, "tl.dot needs every dimension >= 16: pad the rank")
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M is dU's dot M and dB's dot K: >= 16")
    _du_db_program(tl.program_id(0), tl.program_id(1), dy_ptr, u_ptr, b_ptr, ws_du_ptr,
                   ws_db_ptr, du_ptr, db_ptr, counter_ptr, M, N, R, rows_per_split,
                   cols_per_group, scaling, stride_dym, stride_dyn, stride_um, stride_ur,
                   stride_bn, stride_br, row_seg_ptr, col_seg_ptr, col_scale_ptr, COMPUTE_DU,
                   COMPUTE_DB, SEGMENTED, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _lora_bwd_du_db_group_kernel(
        M, rows_per_split, cols_per_group, m_bucket,
        dy_0, u_0, b_0, ws_du_0, ws_db_0, du_0, db_0, N_0, R_0, scaling_0, stride_dym_0,
        stride_dyn_0, stride_um_0, stride_bn_0, stride_br_0,
        dy_1, u_1, b_1, ws_du_1, ws_db_1, du_1, db_1, N_1, R_1, scaling_1, stride_dym_1,
        stride_dyn_1, stride_um_1, stride_bn_1, stride_br_1,
        dy_2, u_2, b_2, ws_du_2, ws_db_2, du_2, db_2, N_2, R_2, scaling_2, stride_dym_2,
        stride_dyn_2, stride_um_2, stride_bn_2, stride_br_2,
        dy_3, u_3, b_3, ws_du_3, ws_db_3, du_3, db_3, N_3, R_3, scaling_3, stride_dym_3,
        stride_dyn_3, stride_um_3, stride_bn_3, stride_br_3,
        counter_ptr, G: tl.constexpr, COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr,
        R_PAD_0: tl.constexpr, R_PAD_1: tl.constexpr, R_PAD_2: tl.constexpr,
        R_PAD_3: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """dU_g = s_g * dy_g @ B_g and dB_g = s_g * dy_g^T @ U_g for a group of G (2..4) members
    (a q/k/v or gate/up group, issue 30) in one launch: the members' column groups side by
    side along program axis 1 (member g's after members 0..g-1's, each member's N_g cut into
    cdiv(N_g, cols_per_group) of them), each program running _lora_bwd_du_db_kernel's program
    on its member's dy_g [M, N_g], U_g [M, R_g] (rows contiguous), B_g [N_g, R_g] and
    workspaces ws_du_g fp32 [cdiv(N_g, cols_per_group), M, R_g], ws_db_g fp32 [S, N_g, R_g],
    into dU_g [M, R_g] and dB_g [N_g, R_g] (contiguous). counter_ptr int32, zero: member g's
    S + cdiv(N_g, cols_per_group) arrival counters after members 0..g-1's. One member's code
    runs per program (a runtime branch; registers: CONFIGS["du_db_group"] says which tiles
    fit); slots past G repeat slot 0's arguments (compiled out). m_bucket: unused, part of the autotune
    key. No SEGMENTED form (a mixed batch is one layer)."""
    tl.static_assert(G >= 1 and G <= 4, "a group has 1..4 members")
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M is dU's dot M and dB's dot K: >= 16")
    pid_s = tl.program_id(0)
    pid = tl.program_id(1)
    num_splits = tl.cdiv(M, rows_per_split)
    t1 = tl.cdiv(N_0, cols_per_group)
    t2 = t1 + tl.cdiv(N_1, cols_per_group)
    t3 = t2 + tl.cdiv(N_2, cols_per_group)
    if pid < t1:
        _du_db_program(pid_s, pid, dy_0, u_0, b_0, ws_du_0, ws_db_0, du_0, db_0, counter_ptr,
                       M, N_0, R_0, rows_per_split, cols_per_group, scaling_0, stride_dym_0,
                       stride_dyn_0, stride_um_0, 1, stride_bn_0, stride_br_0, counter_ptr,
                       counter_ptr, ws_du_0, COMPUTE_DU, COMPUTE_DB, False, R_PAD_0,
                       DOT_PRECISION, BLOCK_M, BLOCK_N)
    elif pid < t2:
        _du_db_program(pid_s, pid - t1, dy_1, u_1, b_1, ws_du_1, ws_db_1, du_1, db_1,
                       counter_ptr + num_splits + t1, M, N_1, R_1, rows_per_split,
                       cols_per_group, scaling_1, stride_dym_1, stride_dyn_1, stride_um_1, 1,
                       stride_bn_1, stride_br_1, counter_ptr, counter_ptr, ws_du_1, COMPUTE_DU,
                       COMPUTE_DB, False, R_PAD_1, DOT_PRECISION, BLOCK_M, BLOCK_N)
    else:
        if G > 2:
            if pid < t3:
                _du_db_program(pid_s, pid - t2, dy_2, u_2, b_2, ws_du_2, ws_db_2, du_2, db_2,
                               counter_ptr + 2 * num_splits + t2, M, N_2, R_2, rows_per_split,
                               cols_per_group, scaling_2, stride_dym_2, stride_dyn_2,
                               stride_um_2, 1, stride_bn_2, stride_br_2, counter_ptr,
                               counter_ptr, ws_du_2, COMPUTE_DU, COMPUTE_DB, False, R_PAD_2,
                               DOT_PRECISION, BLOCK_M, BLOCK_N)
            else:
                if G > 3:
                    _du_db_program(pid_s, pid - t3, dy_3, u_3, b_3, ws_du_3, ws_db_3, du_3,
                                   db_3, counter_ptr + 3 * num_splits + t3, M, N_3, R_3,
                                   rows_per_split, cols_per_group, scaling_3, stride_dym_3,
                                   stride_dyn_3, stride_um_3, 1, stride_bn_3, stride_br_3,
                                   counter_ptr, counter_ptr, ws_du_3, COMPUTE_DU, COMPUTE_DB,
                                   False, R_PAD_3, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _dx_tile(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows int64 [BLOCK_M], cols int64 [BLOCK_K], m_mask, k_mask, k0) of this program's dx
    tile. GROUP_M row tiles sweep the K tiles together: a column band of W is decoded for all
    of them while it is still in L2."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K),
                                GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    return (offs_m.to(tl.int64), offs_k.to(tl.int64), offs_m < M, offs_k < K,
            pid_k * BLOCK_K)


@triton.jit
def _dx_product(acc, dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                code_ptr, rows, m_mask, k0, N, K, stride_dym, stride_dyn, QBLOCK: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                LANE_TABLE: tl.constexpr):
    """acc [BLOCK_K, BLOCK_M] fp32 + (dy @ deq(W))^T over one weight's N: the loop over N
    decodes each [BLOCK_N, BLOCK_K] tile of W in registers from the packed bytes
    (common.decode_tile: K_ALIGNED when K % QBLOCK == 0; otherwise per element, blocks
    straddling rows and odd K included) and feeds its transpose to tl.dot as the first operand
    (sm_90's wgmma reads it from registers)."""
    act = dy_ptr.dtype.element_ty
    table = lane_table(code_ptr, LANE_TABLE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy_t = tl.load(dy_ptr + offs_n.to(tl.int64)[:, None] * stride_dyn
                       + rows[None, :] * stride_dym,
                       mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED,
                        LANE_TABLE)
        acc = tl.dot(tl.trans(w.to(act)), dy_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _nf4_lora_bwd_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            code_ptr, dx_ptr, du_ptr, a_ptr, bits_ptr, M, N, K, R, m_bucket,
                            stride_dym, stride_dyn, stride_dxm, stride_dxk,
                            stride_dum, stride_dur, stride_ar, stride_ak, stride_bm,
                            keep_scale,
                            QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                            K_ALIGNED: tl.constexpr, LORA: tl.constexpr,
                            DROPOUT_BITS: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            LANE_TABLE: tl.constexpr):
    """dx = dU @ A + dy @ deq(W) (LORA) or dx += dy @ deq(W), one [BLOCK_M, BLOCK_K] tile of
    dx per program, W read packed.

    dy_ptr fp16/bf16/fp32 [M, N]; packed_ptr .. code_ptr: the 4-bit W [N, K] (common.py);
    dx_ptr [M, K] in dy's dtype. LORA (16-bit, K_ALIGNED, without dropout or with DROPOUT_BITS:
    the launcher's rule): the accumulator starts from dU @ A, made here before the loop over N
    from du_ptr [M, R] (dU, scaled by s) and a_ptr [R, K] in dy's dtype, over R in chunks of
    LORA_CHUNK; with DROPOUT_BITS, dropout'(dU @ A): the dA kernel's keep bits bits_ptr int32
    [M, K / 32] (row stride stride_bm) applied with keep_scale = 1 / (1 - p); dx is only
    written. Not LORA: dx holds a LoRA term on entry (the dA kernel's, masked; a group's sum;
    DoRA's with dropout) and is the accumulator's initial value (du_ptr, a_ptr, R
    unread). Either way both terms meet in one fp32 accumulator and dx is rounded once, at the
    store. m_bucket: unused here, part of the autotune key.

    The loop over N: _dx_product.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16,
                     "tl.dot needs every dimension >= 16")
    act = dx_ptr.dtype.element_ty
    rows, cols, m_mask, k_mask, k0 = _dx_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    dx_ptrs = dx_ptr + cols[:, None] * stride_dxk + rows[None, :] * stride_dxm
    dx_mask = k_mask[:, None] & m_mask[None, :]
    if LORA:  # dx^T tile = A^T @ dU^T
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        for r0 in range(0, R, LORA_CHUNK):
            offs_r = r0 + tl.arange(0, LORA_CHUNK)
            r_mask = offs_r < R
            a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
                          mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            du_t = tl.load(du_ptr + offs_r[:, None] * stride_dur + rows[None, :] * stride_dum,
                           mask=r_mask[:, None] & m_mask[None, :], other=0.0)
            acc = tl.dot(a_t, du_t, acc, input_precision=DOT_PRECISION)
        if DROPOUT_BITS:  # element (m, k): bit k % 32 of word k // 32 of row m
            word = tl.load(bits_ptr + rows[None, :] * stride_bm + (cols // 32)[:, None],
                           mask=dx_mask, other=0)
            kept = ((word >> (cols % 32)[:, None]) & 1) != 0
            acc = tl.where(kept, acc * keep_scale, 0.0)
    else:
        acc = tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)  # dx^T tile
    acc = _dx_product(acc, dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      code_ptr, rows, m_mask, k0, N, K, stride_dym, stride_dyn, QBLOCK,
                      DOUBLE_QUANT, K_ALIGNED, DOT_PRECISION, BLOCK_N, BLOCK_K, LANE_TABLE)
    tl.store(dx_ptrs, acc.to(act), mask=dx_mask)


@triton.jit
def _nf4_lora_bwd_dx_group_kernel(
        dx_ptr, M, K, m_bucket, stride_dxm, stride_dxk,
        dy_0, packed_0, absmax_0, absmax2_0, code2_0, offset_0, code_0, N_0, stride_dym_0,
        dy_1, packed_1, absmax_1, absmax2_1, code2_1, offset_1, code_1, N_1, stride_dym_1,
        dy_2, packed_2, absmax_2, absmax2_2, code2_2, offset_2, code_2, N_2, stride_dym_2,
        dy_3, packed_3, absmax_3, absmax2_3, code2_3, offset_3, code_3, N_3, stride_dym_3,
        G: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        K_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        LANE_TABLE: tl.constexpr):
    """dx += sum_g dy_g @ deq(W_g) for a group of G (1..4) members that read the same x (a
    q/k/v or gate/up group, issue 30): one [BLOCK_M, BLOCK_K] tile of dx per program, as
    _nf4_lora_bwd_dx_kernel without LORA, running its loop over N once per member on that
    member's dy_g [M, N_g] (rows contiguous) and packed weight (read in place, no concatenated
    copy; the same blocksize, double quantisation and K alignment, each its own code table),
    all into one fp32 accumulator; dx holds the group's summed LoRA term on entry (group.py's
    dA kernel) and is written once. Slots past G repeat slot 0's arguments (compiled out).

    The members' loops are unrolled, so each member's pointers stay kernel parameters (read
    from the constant bank, no registers); picking them per trip of a loop over members held
    them in registers next to the accumulator and spilled 32 B at sm_90's 256x64x128 tile.
    That tile spills unrolled too (40-96 B, two to four members: the dx kernel itself sits at
    250-254 registers there), so sm_90 keeps the members' own dx GEMMs (launch/group.py);
    sm_80, sm_86, sm_89, sm_100 (its headline at 2 stages) and sm_120 (its headline at 128
    rows: SIBLING_FIXES) compile without spills (GROUP_DX_TARGETS)."""
    tl.static_assert(G >= 1 and G <= 4, "a group has 1..4 members")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16,
                     "tl.dot needs every dimension >= 16")
    rows, cols, m_mask, k_mask, k0 = _dx_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    dx_ptrs = dx_ptr + cols[:, None] * stride_dxk + rows[None, :] * stride_dxm
    dx_mask = k_mask[:, None] & m_mask[None, :]
    acc = tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)  # dx^T tile
    acc = _dx_product(acc, dy_0, packed_0, absmax_0, absmax2_0, code2_0, offset_0,
                      code_0, rows, m_mask, k0, N_0, K, stride_dym_0, 1, QBLOCK,
                      DOUBLE_QUANT, K_ALIGNED, DOT_PRECISION, BLOCK_N, BLOCK_K, LANE_TABLE)
    if G > 1:
        acc = _dx_product(acc, dy_1, packed_1, absmax_1, absmax2_1, code2_1, offset_1,
                          code_1, rows, m_mask, k0, N_1, K, stride_dym_1, 1, QBLOCK,
                          DOUBLE_QUANT, K_ALIGNED, DOT_PRECISION, BLOCK_N, BLOCK_K, LANE_TABLE)
    if G > 2:
        acc = _dx_product(acc, dy_2, packed_2, absmax_2, absmax2_2, code2_2, offset_2,
                          code_2, rows, m_mask, k0, N_2, K, stride_dym_2, 1, QBLOCK,
                          DOUBLE_QUANT, K_ALIGNED, DOT_PRECISION, BLOCK_N, BLOCK_K, LANE_TABLE)
    if G > 3:
        acc = _dx_product(acc, dy_3, packed_3, absmax_3, absmax2_3, code2_3, offset_3,
                          code_3, rows, m_mask, k0, N_3, K, stride_dym_3, 1, QBLOCK,
                          DOUBLE_QUANT, K_ALIGNED, DOT_PRECISION, BLOCK_N, BLOCK_K, LANE_TABLE)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def _lora_bwd_da_kernel(x_ptr, du_ptr, a_ptr, ws_ptr, da_ptr, counter_ptr, dx_ptr, M, K, R,
                        seed_ptr, seed_hi, threshold,
                        keep_scale, rows_per_split, m_bucket, stride_xm, stride_xk, stride_dum,
                        stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
                        row_seg_ptr, seg_thr_ptr, seg_keep_ptr, bits_ptr, stride_bm,
                        COMPUTE_DA: tl.constexpr, WRITE_DX: tl.constexpr,
                        WRITE_BITS: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
                        SEGMENTED: tl.constexpr,
                        R_PAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """The two products that need the dropout mask, which is drawn here once for both:
    the fp32 partial of dA = dU^T @ dropout(x) over one row split (COMPUTE_DA), and dx's LoRA
    term dropout'(dU @ A) (WRITE_DX) or the mask itself as bits for the dx GEMM to apply to
    the term it makes (WRITE_BITS), for one column tile.

    x_ptr fp16/bf16/fp32 [M, K] (any strides); du_ptr [M, R] (scaled by s), a_ptr [R, K], in
    x's dtype; ws_ptr fp32 [S, R, K]: ws[s] = dU[rows of s]^T @ dropout(x)[rows of s];
    da_ptr [R, K] in A's dtype (contiguous): the last of a column tile's S programs to finish
    adds ws[0..S-1] there in split order (counter_ptr int32 [column tiles], zero; see
    common.last_to_arrive);
    dx_ptr [M, K] in x's dtype: receives dropout'(dU @ A), which _nf4_lora_bwd_dx_kernel then
    takes as its accumulator's initial value.
    bits_ptr int32 [M, K / 32] (row stride stride_bm; WRITE_BITS, with dropout, K and BLOCK_K
    multiples of 32, not SEGMENTED): bit j of word w of row m is 1 where element (m, 32 w + j)
    is kept (MK / 8 bytes where the term takes 2 MK written and 2 MK read back).
    The mask is regenerated from (seed, m * K + k), as the forward drew it (seed_ptr, seed_hi:
    the forward's seed, common.dropout_seed; common.dropout_keep;
    DROPOUT_GROUPED: K % 8 == 0, one Philox call per 8 elements); the masked x tile is
    rounded to x's dtype (what the forward fed its dot) and is the first dot operand
    (dA^T = dropout(x)^T @ dU). m_bucket: unused here, part of the autotune key.
    SEGMENTED (a mixed batch): each row draws with its adapter slot's threshold and keep scale
    (row_seg_ptr int32 [M], seg_thr_ptr int32 [G], seg_keep_ptr fp32 [G]; dU arrives masked to
    the row's own adapter columns); otherwise those three pointers are unread.
    """
    tl.static_assert(R_PAD >= 16 and BLOCK_M >= 16 and BLOCK_K >= 16,
                     "tl.dot needs every dimension >= 16")
    tl.static_assert(not WRITE_BITS or (HAS_DROPOUT and BLOCK_K % 32 == 0 and not SEGMENTED),
                     "bits: a mask of one keep scale, whole 32-bit words a tile")
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_mask = offs_k < K
    r_mask = offs_r < R
    cols = offs_k.to(tl.int64)  # a column-major x has stride_xk = M: k * M can pass 2^31
    seed = dropout_seed(seed_ptr, seed_hi)  # unread (compiled out) without dropout
    if WRITE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)  # dA^T tile
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        tile_mask = m_mask[:, None] & k_mask[None, :]
        du = tl.load(du_ptr + rows[:, None] * stride_dum + offs_r[None, :] * stride_dur,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            thr = threshold
            scale = keep_scale
            if SEGMENTED:
                thr, scale = row_dropout(segment_of_rows(row_seg_ptr, offs_m, M), seg_thr_ptr,
                                         seg_keep_ptr)
            keep = dropout_keep(seed, offs_m, pid_k * BLOCK_K, K, thr, BLOCK_M, BLOCK_K,
                                DROPOUT_GROUPED)
        if COMPUTE_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=tile_mask, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(act)
            acc = tl.dot(tl.trans(x), du, acc, input_precision=DOT_PRECISION)
        if WRITE_DX:
            lora = tl.dot(du, a, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                lora = tl.where(keep, lora * scale, 0.0)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     lora.to(act), mask=tile_mask)
        if WRITE_BITS:  # distinct powers of two: the sum is their OR, no carry
            words = tl.sum(tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 32, 32))
                           << tl.arange(0, 32)[None, None, :], axis=2)
            offs_w = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
            tl.store(bits_ptr + rows[:, None] * stride_bm + offs_w[None, :], words,
                     mask=m_mask[:, None] & (offs_w < K // 32)[None, :])
    if COMPUTE_DA:
        ws = ws_ptr + (pid_s.to(tl.int64) * R + offs_r[None, :]) * K + offs_k[:, None]
        tl.store(ws, acc, mask=k_mask[:, None] & r_mask[None, :])
        _finish_cols(ws_ptr, da_ptr, counter_ptr + pid_k, tl.cdiv(M, rows_per_split),
                     pid_k * BLOCK_K, K, R, R_PAD, BLOCK_K)


# ----------------------------------------------------------------------------- configs

def _cfg(num_warps, num_stages, max_r_pad=MAX_R_PAD, large_m=False, **blocks):
    """A config, shipped for padded ranks up to `max_r_pad` (where it was compiled). large_m:
    a headline dx config, the only kind timed from an M bucket of LARGE_M on, and only with
    K_ALIGNED (its per-element decode for K % blocksize != 0 spills: 920 B on sm_90)."""
    config = triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
    config.max_r_pad = max_r_pad
    config.large_m = large_m
    return config


LARGE_M = 4096
HEADLINE_CEILING = 0.85  # the modelled tensor-core share a large_m dx config must reach
LORA_SIDE_CEILING = 0.75  # the modelled HBM share a large_m du_db / da config must reach


# What the GPU autotunes over, per kernel, arch and activation class (16-bit or fp32: fp32
# operands take twice the registers). Every entry compiles with zero spill bytes for its arch
# (COMPILE_SPECS, at its largest R_PAD, double-quant on, K aligned or not, 16-byte aligned
# arguments as at a real launch). Measured and dropped (registers capped at 255):
# dx 64x64x64 w4 (sm_90 K unaligned: 72 B; sm_80: 48 B), dx 256x64x64 w8 (sm_80: 96 B),
# dx fp32 256x32x64 w8 (sm_80: 40 B); du_db 32x128 w4 at R_PAD 64 (sm_80: 16 B);
# rank-wide tiles spill at R_PAD 256 unless they are 16-32 rows (du_db 64x64 w4: 720 B).
# Shapes, for M = 8192, 4096 x 14336, r = 16:
# - dx is the GEMM (2*M*N*K flops). Each weight tile is decoded once per BLOCK_M rows, so
#   BLOCK_M is the large side (256 amortises the decode over 256 rows of dy); the decoded
#   [BLOCK_N, BLOCK_K] tile is kept small (32-64 x 64) next to the accumulator.
# - du_db reads dy once (memory-bound, 2*M*N bytes); da reads x once and draws the mask.
# 16-bit activations: the same lists compile spill-free on sm_80 and sm_90.
# Older Triton releases allocate registers differently: where a config spills on one, it ships
# there with fewer stages (or other warps) instead, by_triton(the config, v3_5=...), with the
# bytes it spilled in a comment; .ci/support-range compiles every list under each release.
_DU_DB_16BIT = [_cfg(4, 3, 64, BLOCK_M=64, BLOCK_N=64), _cfg(8, 3, 64, BLOCK_M=64, BLOCK_N=128),
                _cfg(4, 3, 64, BLOCK_M=32, BLOCK_N=64), _cfg(8, 2, BLOCK_M=32, BLOCK_N=32),
                _cfg(4, 2, BLOCK_M=16, BLOCK_N=32)]
# large_m (the configs timed from M = 4096 on, gated at LORA_SIDE_CEILING of HBM bandwidth
# on their tiles; issue 11), modelled at R_PAD 64 / 16: da 64x64 w4 0.99 / sm_90, 0.76 sm_80;
# du_db sm_90 128x64 w8 1.00 / 1.00, sm_80 128x128 w8 (r <= 16) 1.00. Nothing compiled for
# du_db on sm_80 at R_PAD 64 reaches 0.75 (128x64 w8 0.35, 256x64 w8 0.46, 64x64 w4 0.34):
# there dy's transposed use goes through shared memory twice per tile.
_DA_16BIT = [_cfg(4, 3, 64, True, BLOCK_M=64, BLOCK_K=64),
             _cfg(8, 3, 64, BLOCK_M=64, BLOCK_K=128),
             _cfg(4, 3, 64, BLOCK_M=32, BLOCK_K=64), _cfg(4, 2, BLOCK_M=16, BLOCK_K=64),
             _cfg(4, 2, BLOCK_M=16, BLOCK_K=32)]
CONFIGS = {
    "dx": {
        # modelled hot-loop ceilings (bf16, K aligned): 256x64x128 1.00 (254 registers),
        # 256x32x64 0.53, 256x64x64 0.65, 128x64x64 w8 0.39, 32x64x64 w4 0.16
        ("sm_90", False): [_cfg(8, 3, large_m=True, BLOCK_M=256, BLOCK_N=64, BLOCK_K=128,
                                GROUP_M=8),
                           _cfg(8, 3, BLOCK_M=256, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
                           _cfg(8, 4, BLOCK_M=256, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
                           # 3.5: 8 B K-unaligned
                           by_triton(_cfg(8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                                     v3_5=_cfg(8, 2, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64,
                                               GROUP_M=8)),
                           _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                           # K-unaligned: 3.5 88 B, 3.7 8 B
                           by_triton(_cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                                     v3_5=_cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64,
                                               GROUP_M=8),
                                     v3_7=_cfg(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64,
                                               GROUP_M=8))],
        # 256x16x128 0.86 (244 registers), 256x32x64 0.74, 32x64x64 w4 0.26. Dropped with the
        # register-table decode: 128x64x64 w8 and 128x32x64 w4 (16 and 8 B spilled),
        # 256x32x128 w8 (1.00 but 16 B spilled), 256x64x128 w8 (80 B)
        ("sm_80", False): [_cfg(8, 3, large_m=True, BLOCK_M=256, BLOCK_N=16, BLOCK_K=128,
                                GROUP_M=8),
                           _cfg(8, 3, BLOCK_M=256, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
                           # 64x32, not 32x64: with the register table 32x64x64 w4 s3
                           # spills 96 B on K-unaligned shapes (64x32: 202 registers there,
                           # 124 aligned, 128 at blocksize 32)
                           _cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)],
        ("sm_90", True): [_cfg(8, 3, BLOCK_M=256, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
                          _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                          # 3.5: 216 B K-unaligned
                          by_triton(_cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                                    v3_5=_cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64,
                                              GROUP_M=8))],
        ("sm_80", True): [# 3.5: 64 B K-unaligned
                          by_triton(_cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                                    v3_5=_cfg(8, 1, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64,
                                              GROUP_M=8)),
                          # 3.5, 3.6, 3.7: 24 B at blocksize 32
                          by_triton(_cfg(8, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
                                    **dict.fromkeys(("v3_5", "v3_6", "v3_7"), _cfg(
                                        8, 2, BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8))),
                          _cfg(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)],
    },
    "du_db": {
        ("sm_90", False): [_cfg(8, 3, 64, True, BLOCK_M=128, BLOCK_N=64)] + _DU_DB_16BIT,
        ("sm_80", False): [_cfg(8, 3, 16, True, BLOCK_M=128, BLOCK_N=128)] + _DU_DB_16BIT,
        ("sm_90", True): [by_triton(_cfg(4, 3, 64, BLOCK_M=64, BLOCK_N=64),  # 3.6: 48 B
                                    v3_6=_cfg(4, 2, 64, BLOCK_M=64, BLOCK_N=64)),
                          by_triton(_cfg(4, 3, 64, BLOCK_M=32, BLOCK_N=64),  # 3.5: 24 B
                                    v3_5=_cfg(4, 2, 64, BLOCK_M=32, BLOCK_N=64)),
                          _cfg(8, 2, BLOCK_M=32, BLOCK_N=32),
                          _cfg(8, 2, BLOCK_M=16, BLOCK_N=16)],
        ("sm_80", True): [by_triton(_cfg(8, 3, 16, BLOCK_M=64, BLOCK_N=128),  # 3.5: 80 B
                                    v3_5=_cfg(8, 2, 16, BLOCK_M=64, BLOCK_N=128)),
                          _cfg(8, 2, 64, BLOCK_M=32, BLOCK_N=32),
                          _cfg(4, 2, 64, BLOCK_M=16, BLOCK_N=32),
                          _cfg(8, 2, BLOCK_M=16, BLOCK_N=16)],
    },
    "da": {
        ("sm_90", False): _DA_16BIT,
        ("sm_80", False): _DA_16BIT,
        # 2 stages (3 spilled 8 B on 3.6, and on 3.9 once the dropout seed came from the
        # device, issue 30)
        ("sm_90", True): [_cfg(4, 2, 64, BLOCK_M=64, BLOCK_K=64),
                          _cfg(4, 3, 64, BLOCK_M=32, BLOCK_K=64),
                          _cfg(4, 2, 64, BLOCK_M=16, BLOCK_K=64),
                          _cfg(4, 2, BLOCK_M=16, BLOCK_K=32)],
        ("sm_80", True): [_cfg(4, 3, 64, BLOCK_M=32, BLOCK_K=64),
                          _cfg(4, 2, 64, BLOCK_M=16, BLOCK_K=64),
                          _cfg(4, 2, BLOCK_M=16, BLOCK_K=32)],
    },
}

# fp32 activations at full precision (DOT_PRECISION "ieee", torch's default allow_tf32=False):
# tl.dot runs on the FMA units (no fp32 x fp32 tensor-core instruction), and Triton's FMA dot
# holds each thread's rows of one operand and columns of the other over the whole dot K in
# registers, so the fp32 lists above spill there (dx [arch, True][0]: 64 B on sm_90, 6200 B
# on sm_80). IEEE_CONFIGS[kernel][arch], all spill-free (fp32 registers, dx: K aligned /
# not; du_db and da at their max R_PAD: sm_80 / sm_90):
# - dx: the dot's K is BLOCK_N, kept at 16-32 (or BLOCK_K 32). sm_90 256x16x64 w8 208 / 220,
#   256x32x32 w8 164 / 166, 128x64x64 w8 209 / 222, 64x32x64 w4 218 / 222; sm_80 256x16x64 w8
#   198 / 201, 128x32x32 w8 94 / 98, 64x32x64 w8 116 / 106, 32x16x64 w4 96 / 106. Dropped:
#   sm_90 32x64x64 w4 (176 B K unaligned), 64x64x64 w4 (256 B), 32x32x64 w4 (8 B); sm_80
#   128x32x64 w8 (136 B), 64x32x64 w4 (144 B), 256x32x32 w8 (184 B), 64x64x32 w4 (3792 B).
# - du_db / da: one stage where R_PAD is large (at R_PAD 256 every 2-stage candidate tried on
#   sm_90, 16-64 rows x 16-64 columns at 4-16 warps, spilled 144 B to 10 KB; one stage did
#   not): du_db 64x64 w4 s1 (r 16) 128 / 102, 32x32 w8 (r 64) 122 / 98, 16x32 w8 (r 64)
#   156 / 128, 16x16 w8 s1 (r 256) 172 / 186; da 64x64 w4 s1 (r 16) 198 / 185,
#   32x64 w8 s1 (r 64) 102 / 100, 16x64 w8 s1 (r 64) 80 / 90, 16x32 w8 s1 (r 256) 110 / 102.
#   Dropped: du_db 16x16 w8 s2 at r 256 (144 B on sm_90), 32x64 w8 s2 at r 64 (2184 B),
#   64x64 w4 s3 at r 16 (176 B); da 16x32 w4 s2 at r 256 (6264 B), 16x16 w8 s2 at r 256
#   (208 B), 32x64 w8 s2 at r 64 (2664 B), 64x64 w4 s3 at r 16 (232 B).
# With the in-kernel sums (common.last_to_arrive; Triton 3.9) du_db 16x32 w8 s2 spilled 32 B
# on sm_80 (s1 now, as on 3.5 before), da 64x64 w4 8 B on sm_80 (w8 now, as on 3.7 before:
# 153 / 127 registers) and da 32x64 w8 s1 8 B on sm_90 (dropped, as on 3.7 before: 16x64
# covers r 64). Per Triton release: da 16x64 w8 16 B on sm_90 on 3.5 and 3.7 (w4 there);
# 16x32 w8 16 B at r 256 on sm_80 with 3.6 (w4 there, _DA_IEEE_SM80).
# (3.5 / 3.7: 32x32 w8 s2 spills 24-40 B with the in-kernel sums; s1 there)
_DU_DB_IEEE = [_cfg(4, 1, 16, BLOCK_M=64, BLOCK_N=64),
               by_triton(_cfg(8, 2, 64, BLOCK_M=32, BLOCK_N=32),
                         **dict.fromkeys(("v3_5", "v3_7"), _cfg(8, 1, 64, BLOCK_M=32,
                                                                BLOCK_N=32))),
               _cfg(8, 1, 64, BLOCK_M=16, BLOCK_N=32),
               _cfg(8, 1, BLOCK_M=16, BLOCK_N=16)]
# the r 256 tile: 4 warps on 3.9 (8 spill 8 B since the dropout seed comes from the device,
# issue 30: 157 registers at 4)
_DA_IEEE = [_cfg(8, 1, 16, BLOCK_M=64, BLOCK_K=64),
            by_triton(_cfg(8, 1, 64, BLOCK_M=16, BLOCK_K=64),
                      **dict.fromkeys(("v3_5", "v3_7"), _cfg(4, 1, 64, BLOCK_M=16, BLOCK_K=64))),
            # 3.5: 8 warps 16x32 took 16 B of stack on sm_90 (80 registers), 4 warps 304 B
            by_triton(_cfg(4, 1, BLOCK_M=16, BLOCK_K=32),
                      v3_5=_cfg(8, 1, BLOCK_M=16, BLOCK_K=16),
                      **dict.fromkeys(("v3_6", "v3_7", "v3_8"),
                                      _cfg(8, 1, BLOCK_M=16, BLOCK_K=32)))]
# sm_80 on 3.6: the r 256 tile at 4 warps (w4 spills 7064 B on sm_90 there)
_DA_IEEE_SM80 = _DA_IEEE[:-1] + [by_triton(_cfg(8, 1, BLOCK_M=16, BLOCK_K=32),
                                           v3_6=_cfg(4, 1, BLOCK_M=16, BLOCK_K=32))]
IEEE_CONFIGS = {
    "dx": {
        # With the register-table decode, 2 stages where 3 spilled (sm_90 256x16x64 32 B at
        # blocksize 32, 128x64x64 48 B and 64x32x64 32 B K-unaligned; sm_80 128x32x32 16 B),
        # and on sm_80 256x16x32 / 128x16x64 for 256x16x64 (8-24 B at any stage count) and
        # 64x32x64 w8 (16 B)
        # 256x16x64 s2 on 3.5 (16-56 B) and 3.6 (8 B at blocksize 32): 1 stage there
        "sm_90": [by_triton(_cfg(8, 2, BLOCK_M=256, BLOCK_N=16, BLOCK_K=64, GROUP_M=8),
                            **dict.fromkeys(("v3_5", "v3_6"), _cfg(
                                8, 1, BLOCK_M=256, BLOCK_N=16, BLOCK_K=64, GROUP_M=8))),
                  _cfg(8, 3, BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
                  _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                  _cfg(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)],
        "sm_80": [_cfg(8, 3, BLOCK_M=256, BLOCK_N=16, BLOCK_K=32, GROUP_M=8),
                  _cfg(8, 2, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
                  by_triton(_cfg(8, 3, BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, GROUP_M=8),
                            v3_7=_cfg(8, 2, BLOCK_M=128, BLOCK_N=16, BLOCK_K=64,  # 3.7: 16 B
                                      GROUP_M=8)),
                  _cfg(4, 3, BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=8)],
    },
    "du_db": {"sm_90": _DU_DB_IEEE, "sm_80": _DU_DB_IEEE},
    "da": {"sm_90": _DA_IEEE, "sm_80": _DA_IEEE_SM80},
}


# On sm_80's siblings (common.SM80_SIBLINGS; Triton 3.9): dx 128x32x32 w8 at full precision
# spills 16 B on sm_86 / sm_89 with 2 stages, K unaligned (3 stages: 146 registers, none); on
# sm_120 du_db 128x128 w8 (16-bit, the r <= 16 large-M tile) spills 24 B at any stage count in
# a mixed batch: that GPU times the other du_db tiles. On sm_100 (B200) the du_db and du_db
# group 64x128 w8 tiles at 3 stages spill at R_PAD 64 (16-224 B) and fp32 (80 B): 1 stage holds
# them (163-216 registers); du_db 128x128 w8 spills in a mixed batch at R_PAD 64 at 3 stages
# (200 B, and 245,792 B of shared memory) and at R_PAD 16 at 1 (8 B): dropped there as on
# sm_120; the full-precision du_db 16x32 tile takes 4 warps (16 B at 8), dA 64x64 w4 s3 8 warps
# and 2 stages (8 B at 3 stages in a mixed batch at R_PAD 64, 8 B at 2 stages without; w8 s2
# holds R_PAD 16, 64 and mixed, 66-100 registers) and the fp32 dx 128x32x64 tile 2 stages (8 B
# at 3, blocksize 32). sm_100's 16-bit dx headline is 256x64x128 w8 s3 (sm_90's tile), not
# sm_80's 256x16x128: tcgen05 reads the decoded tile from shared memory, so per trip the decode
# (shuffles, stores, operand reads) weighs against 4x the MMA work. Modelled (bf16, Triton 3.9):
# 256x16x128 0.33, 256x32x128 0.39, 256x64x128 s2/s3 0.42 (166-170 registers, 87/125 KB of
# shared memory), 256x128x128 s2 0.44 (174 KB: one block per SM), 256x*x64 0.28-0.31; BLOCK_K
# 256 reached 0.43-0.47 but spilled 24 B (the accumulator's 256 columns read out of tensor
# memory at the store).
_DU_DB_KERNELS = ("_lora_bwd_du_db_kernel", "_lora_bwd_du_db_group_kernel")
SIBLING_FIXES = (
    SiblingFix("_nf4_lora_bwd_dx_kernel", ("sm_86", "sm_89"),
               {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
               {"num_stages": 3}, ieee=True),
    SiblingFix("_lora_bwd_du_db_kernel", ("sm_100", "sm_120"),
               {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}, None, fp32=False),
    SiblingFix(_DU_DB_KERNELS, ("sm_100",),
               {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
               {"num_stages": 1}),
    SiblingFix("_lora_bwd_du_db_kernel", ("sm_100",),
               {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8}, {"num_warps": 4}, ieee=True),
    SiblingFix("_lora_bwd_da_kernel", ("sm_100",),
               {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
               {"num_warps": 8, "num_stages": 2}, fp32=False),
    SiblingFix("_nf4_lora_bwd_dx_kernel", ("sm_100",),
               {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
               {"num_stages": 2}, fp32=True, ieee=False),
    SiblingFix("_nf4_lora_bwd_dx_kernel", ("sm_100",),
               {"BLOCK_M": 256, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8},
               {"BLOCK_N": 64}, fp32=False),
    SiblingFix("_nf4_lora_bwd_dx_group_kernel", ("sm_120",),
               {"BLOCK_M": 256, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8},
               {"BLOCK_M": 128}, fp32=False),
    SiblingFix("_nf4_lora_bwd_dx_group_kernel", ("sm_100",),
               {"BLOCK_M": 256, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8},
               {"BLOCK_N": 64, "num_stages": 2}, fp32=False),
)


def config_list(kernel: str, arch: str, fp32: bool, precision: str,
                target: str | None = None) -> list:
    """What the GPU autotunes `kernel` over: IEEE_CONFIGS[kernel][arch] for fp32 activations at
    precision 'ieee' (fastlora.launch.common.dot_precision), else CONFIGS[kernel][arch, fp32];
    arch the config family ('sm_80' / 'sm_90'), target the compile target when it is one of
    sm_80's siblings (SIBLING_FIXES)."""
    ieee = fp32 and precision == "ieee"
    name = CONFIGS_OF.get(kernel, kernel)
    configs = IEEE_CONFIGS[name][arch] if ieee else CONFIGS[name][arch, fp32]
    return sibling_configs(SIBLING_FIXES, KERNELS[kernel].__name__, target or arch, configs,
                           fp32, ieee)


# The interpreter runs one fixed small config (the autotuner would time every config there).
INTERPRETER_CONFIGS = {
    "dx": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4),
    "du_db": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32),
    "da": _cfg(4, 1, BLOCK_M=32, BLOCK_K=64),
}
# the group's dx GEMM runs the dx kernel's loop per member: it takes the dx kernel's configs
# (compiled for it in COMPILE_SPECS; 16-bit and tf32 only: the launcher keeps fp32 'ieee'
# groups on the per-member GEMMs)
CONFIGS_OF = {"dx_group": "dx"}
# the compile targets where the group's dx GEMM runs: the sm_80 family's configs compile without
# spills there, sm_120's 16-bit headline as 128x16x128 (SIBLING_FIXES: 256x16x128 spilled
# 16-24 B at 2-4 stages and 4 members; 128x16x128 w8 s3 180 registers, 256x32x64 238, both
# modelled 1.00 at 2-4 members, every other entry of the list spill-free at 4 members), sm_100's
# as its dx headline 256x64x128 at 2 stages (SIBLING_FIXES: 8 B spilled at 3 stages, 255
# registers; at 2 250 registers for 2-4 members, 87 KB of shared memory, modelled 0.42 as the
# dx kernel's; the list's other entries as sm_80's, spill-free at 4 members, 80-216 registers:
# tcgen05's accumulator lives in tensor memory); not sm_90 (the kernel's docstring says why)
GROUP_DX_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_100", "sm_120")
# the compile targets where dropout's mask enters the dx GEMM as the dA kernel's bits (module
# docstring): sm_80's config family, whose lists compile spill-free with them (headlines: sm_80
# 256x16x128 228 registers, sm_86 / sm_89 230, sm_120 235, sm_100's 256x64x128 242; modelled
# ceilings as without), on Triton 3.7 and newer (3.5 / 3.6: 224-280 B at sm_80's headline);
# not sm_90 (120 B at its headline; its other tiles model 0.49 and less)
DROPOUT_BITS_TARGETS = by_triton(("sm_80",) + SM80_SIBLINGS, v3_5=(), v3_6=())
INTERPRETER_CONFIGS["dx_group"] = INTERPRETER_CONFIGS["dx"]
INTERPRETER_CONFIGS["du_db_group"] = INTERPRETER_CONFIGS["du_db"]
# A group's dU/dB pass (issue 30) runs du_db's program per member: du_db's 16-bit configs (the
# launcher keeps fp32 groups on each member's du_db), compiled for 2, 3 and 4 members at their
# largest padded ranks (64 + 64, 64 + 32 + 32, 64 + 16 + 16 + 16), without those that spilled
# there on a Triton release 3.5-3.9: on sm_80's family 64x64 w4 s3 (80 B on sm_80 at 64 + 64),
# 32x32 w8 s2 (8-24 B on sm_80, sm_86 and sm_120), 16x32 w4 s2 (8 B on sm_86) and 32x64 w4 s3
# (16 B on sm_86 / sm_89); on sm_90 32x32 w8 s2 (8-24 B on 3.5-3.7) and 16x32 w4 s2 (16 B).
# ptxas held several of them at 128 registers, where du_db alone takes 150-255, with or
# without the sums' noinline calls (and with each member's program a noinline function of its
# own). fp32 (tf32) tiles spilled 8-56 B on one release or another (sm_90 64x64 w4 and
# 32x64 w4, sm_80 16x32 w4 and 16x16 w8).
_GROUP_SPILLED = {"sm_80": {(64, 64, 4), (32, 32, 8), (16, 32, 4), (32, 64, 4)},
                  "sm_90": {(32, 32, 8), (16, 32, 4)}}
CONFIGS["du_db_group"] = {
    (arch, False): [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                    not in _GROUP_SPILLED[arch]]
    for (arch, fp32), configs in CONFIGS["du_db"].items() if not fp32}


def prune_configs(configs, m_bucket_: int, r_pad: int, k_aligned: bool = True):
    """Configs worth timing for this problem: shipped for this padded rank (and, for the
    large_m ones, K aligned), and no row tile more than twice the (bucketed) M; from an M
    bucket of LARGE_M on, the large_m configs alone when any is left. Keeps the smallest
    rank-safe tile when nothing passes."""
    fits = [c for c in configs if r_pad <= c.max_r_pad and (k_aligned or not c.large_m)]
    keep = [c for c in fits if c.kwargs["BLOCK_M"] <= 2 * m_bucket_]
    if m_bucket_ >= LARGE_M:
        keep = [c for c in keep if c.large_m] or keep
    return keep or [min(fits, key=lambda c: c.kwargs["BLOCK_M"])]


def _early_prune(configs, named_args, **kwargs):
    r_pads = [v for name, v in kwargs.items() if name.startswith("R_PAD")]  # a group: R_PAD_g
    return prune_configs(configs, named_args["m_bucket"], max(r_pads, default=16),
                         kwargs.get("K_ALIGNED", True))


_KEYS = {"dx": ["m_bucket", "N", "K", "QBLOCK", "DOUBLE_QUANT", "K_ALIGNED", "LORA",
                "DROPOUT_BITS", "DOT_PRECISION"],
         "du_db": ["m_bucket", "N", "R_PAD", "COMPUTE_DU", "COMPUTE_DB", "SEGMENTED",
                   "DOT_PRECISION"],
         "da": ["m_bucket", "K", "R_PAD", "COMPUTE_DA", "WRITE_DX", "WRITE_BITS", "HAS_DROPOUT",
                "SEGMENTED", "DOT_PRECISION"],
         "dx_group": ["m_bucket", "N_0", "N_1", "N_2", "N_3", "K", "G", "QBLOCK",
                      "DOUBLE_QUANT", "K_ALIGNED", "DOT_PRECISION"],
         "du_db_group": ["m_bucket", "N_0", "N_1", "N_2", "N_3", "G", "R_PAD_0", "R_PAD_1",
                         "R_PAD_2", "R_PAD_3", "COMPUTE_DU", "COMPUTE_DB", "DOT_PRECISION"]}
KERNELS = {"dx": _nf4_lora_bwd_dx_kernel, "du_db": _lora_bwd_du_db_kernel,
           "da": _lora_bwd_da_kernel, "dx_group": _nf4_lora_bwd_dx_group_kernel,
           "du_db_group": _lora_bwd_du_db_group_kernel}
# Arguments a kernel reads as well as writes, which the autotuner must restore after each
# timed run: without LORA, dx enters _nf4_lora_bwd_dx_kernel holding the LoRA term and leaves
# holding dx = LoRA term + dy @ deq(W); timing configs without a restore would add dy @ deq(W)
# once per timed run (with LORA the copy is not needed, but the autotuner takes one list).
# du_db adds into its workspace too, but after a plain store on its first row block, so
# re-running it leaves the same result; da only stores; dx_group always adds, like dx without
# LORA; du_db_group stores and adds as du_db does.
RESTORE_VALUE = {"dx": ["dx_ptr"], "du_db": [], "da": [], "dx_group": ["dx_ptr"],
                 "du_db_group": []}


def build_autotuner(kernel: str, arch: str, fp32: bool, precision: str,
                    target: str | None = None):
    """A triton.autotune launcher of `kernel` over config_list(kernel, arch, fp32, precision,
    target) (the launcher caches one per key), restoring RESTORE_VALUE[kernel] between timed
    runs."""
    return triton.autotune(configs=config_list(kernel, arch, fp32, precision, target),
                           key=_KEYS[kernel],
                           prune_configs_by={"early_config_prune": _early_prune},
                           restore_value=RESTORE_VALUE[kernel] or None
                           )(KERNELS[kernel])


# ----------------------------------------------------------------------------- compile specs

# Contiguous last dimensions have stride 1 at a launch, which Triton specialises as a constant.
UNIT_STRIDES = {"dx": {"stride_dyn": 1, "stride_dxk": 1, "stride_dur": 1, "stride_ak": 1},
                "du_db": {"stride_dyn": 1, "stride_ur": 1, "stride_br": 1},
                "da": {"stride_xk": 1, "stride_dur": 1, "stride_ak": 1, "stride_dxk": 1},
                "dx_group": {"stride_dxk": 1},
                "du_db_group": {name: 1 for g in range(4)
                                for name in (f"stride_dyn_{g}", f"stride_br_{g}")}}
# Arguments that are multiples of 16 at a real launch (CompileSpec.aligned): pointers of fresh
# tensors, model extents (M = tokens, N and K = 4096, 14336, ...) and the strides built of them.
ALIGNED_ARGS = ("dy_ptr", "packed_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr",
                "code_ptr", "dx_ptr", "u_ptr", "b_ptr", "ws_du_ptr", "ws_db_ptr", "x_ptr",
                "du_ptr", "a_ptr", "ws_ptr", "db_ptr", "da_ptr", "bits_ptr", "M", "N", "K",
                "stride_dym", "stride_dxm", "stride_um", "stride_bn", "stride_xm", "stride_dum",
                "stride_ar", "stride_bm",
                "rows_per_split", "cols_per_group", "m_bucket",
                *(f"{name}_{g}" for g in range(4) for name in (
                    "dy", "packed", "absmax", "absmax2", "code2", "offset", "code", "N",
                    "stride_dym", "u", "b", "ws_du", "ws_db", "du", "db", "stride_um",
                    "stride_bn")))


def _spec(kernel, cfg, arch, act, r_pad, sig, flags, label, options=None, precision=None,
          **trip):
    """precision: DOT_PRECISION; None: tf32 for fp32 (16-bit operands ignore it).
    trip: CompileSpec's trip_flops or trip_bytes (one trip of the kernel's main loop)."""
    fn = KERNELS[kernel]
    units = UNIT_STRIDES[kernel]
    sig = {name: t for name, t in sig.items() if name not in units}
    precision = precision or ("tf32" if act == "fp32" else "ieee")
    fma = act == "fp32" and precision == "ieee"
    consts = {**flags, "DOT_PRECISION": precision, **cfg.kwargs,
              **units, **({"R_PAD": r_pad} if r_pad else {})}
    return CompileSpec(kernel=fn.__name__, fn=fn, signature=sig, constexprs=consts,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, archs=(arch,),
                       label=f"{label}{' ieee' * fma}", options=options or {},
                       aligned=ALIGNED_ARGS, fma_dot=fma, **trip)


def _ints(*names):
    return {name: "i32" for name in names}


def _dx_spec(cfg, arch, act, k_aligned, precision=None, qblock=64):
    """A headline (large_m) config, K aligned at blocksize 64, is gated at HEADLINE_CEILING."""
    sig = {"dy_ptr": f"*{act}", "packed_ptr": "*u8", "absmax_ptr": "*u8",
           "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
           "code_ptr": "*fp32", "dx_ptr": f"*{act}", "du_ptr": f"*{act}", "a_ptr": f"*{act}",
           "bits_ptr": "*i32",
           **_ints("M", "N", "K", "R", "m_bucket", "stride_dym", "stride_dyn", "stride_dxm",
                   "stride_dxk", "stride_dum", "stride_dur", "stride_ar", "stride_ak",
                   "stride_bm"), "keep_scale": "fp32"}
    # the worst case: the LoRA term made in the GEMM where the launcher lets it (16-bit, K
    # aligned), with dropout's bits where it takes them (sm_80's family)
    lora = k_aligned and act != "fp32"
    flags = {"QBLOCK": qblock, "DOUBLE_QUANT": True, "K_ALIGNED": k_aligned, "LANE_TABLE": True,
             "LORA": lora, "DROPOUT_BITS": lora and arch in DROPOUT_BITS_TARGETS}
    label = f"{act} k_aligned={int(k_aligned)}{f' bs{qblock}' if qblock != 64 else ''}"
    b = cfg.kwargs
    return _spec("dx", cfg, arch, act, None, sig, flags, label, {"enable_fp_fusion": False},
                 precision, trip_flops=2 * b["BLOCK_M"] * b["BLOCK_N"] * b["BLOCK_K"],
                 trip_blocks=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                 ceiling_target=HEADLINE_CEILING if cfg.large_m and k_aligned and qblock == 64
                 else 0.0)


def _dx_group_spec(cfg, arch, act, members=4):
    """The group's dx GEMM at its worst case: four members (the loop compiled four times), K
    aligned (the launcher's only case); a headline (large_m) config gated as the dx kernel's.
    """
    sig = {"dx_ptr": f"*{act}", **_ints("M", "K", "m_bucket", "stride_dxm", "stride_dxk")}
    for g in range(4):
        sig.update({f"dy_{g}": f"*{act}", f"packed_{g}": "*u8", f"absmax_{g}": "*u8",
                    f"absmax2_{g}": "*fp32", f"code2_{g}": "*fp32", f"offset_{g}": "*fp32",
                    f"code_{g}": "*fp32", **_ints(f"N_{g}", f"stride_dym_{g}")})
    flags = {"G": members, "QBLOCK": 64, "DOUBLE_QUANT": True, "K_ALIGNED": True,
             "LANE_TABLE": True}
    b = cfg.kwargs
    return _spec("dx_group", cfg, arch, act, None, sig, flags, f"{act} G={members}",
                 {"enable_fp_fusion": False},
                 trip_flops=2 * b["BLOCK_M"] * b["BLOCK_N"] * b["BLOCK_K"],
                 trip_blocks=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                 ceiling_target=HEADLINE_CEILING if cfg.large_m else 0.0,
                 bounded_args=BOUNDED_ARGS + tuple(
                     f"{name}_{g}" for g in range(4)
                     for name in ("code", "code2", "offset", "absmax2")),
                 not_for=tuple(a for a in SM80_SIBLINGS if a not in GROUP_DX_TARGETS))


def _du_db_spec(cfg, arch, act, precision=None, r_pad=None, target=0.0, segmented=False):
    sig = {"dy_ptr": f"*{act}", "u_ptr": f"*{act}", "b_ptr": f"*{act}", "ws_du_ptr": "*fp32",
           "ws_db_ptr": "*fp32", "du_ptr": f"*{act}", "db_ptr": f"*{act}",
           "counter_ptr": "*i32",
           **_ints("M", "N", "R", "rows_per_split", "cols_per_group", "m_bucket"),
           "scaling": "fp32",
           **_ints("stride_dym", "stride_dyn", "stride_um", "stride_ur", "stride_bn",
                   "stride_br"),
           "row_seg_ptr": "*i32", "col_seg_ptr": "*i32", "col_scale_ptr": "*fp32"}
    flags = {"COMPUTE_DU": True, "COMPUTE_DB": True, "SEGMENTED": segmented}
    elt = 4 if act == "fp32" else 2
    r_pad = r_pad or cfg.max_r_pad
    return _spec("du_db", cfg, arch, act, r_pad, sig, flags,
                 f"{act} R_PAD={r_pad}{' mixed' * segmented}",
                 precision=precision, ceiling_target=target,
                 trip_bytes=cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * elt,  # dy tile
                 trip_blocks=("BLOCK_M", "BLOCK_N"))


# a group's members at their largest padded ranks (their sum pads to 128 at most:
# launch/group.py MAX_TOTAL_R_PAD), per member count
GROUP_R_PADS = {2: (64, 64), 3: (64, 32, 32), 4: (64, 16, 16, 16)}


def _du_db_group_spec(cfg, arch, act, members):
    """A group's dU/dB pass for `members` members at GROUP_R_PADS (capped at the padded rank
    the config ships for); a large_m config gated as du_db's."""
    r_pads = [min(cfg.max_r_pad, r) for r in GROUP_R_PADS[members]]
    r_pads += [r_pads[0]] * (4 - members)  # unread slots
    sig = {**_ints("M", "rows_per_split", "cols_per_group", "m_bucket"), "counter_ptr": "*i32"}
    for g in range(4):
        sig.update({f"dy_{g}": f"*{act}", f"u_{g}": f"*{act}", f"b_{g}": f"*{act}",
                    f"ws_du_{g}": "*fp32", f"ws_db_{g}": "*fp32", f"du_{g}": f"*{act}",
                    f"db_{g}": f"*{act}", **_ints(f"N_{g}", f"R_{g}"), f"scaling_{g}": "fp32",
                    **_ints(f"stride_dym_{g}", f"stride_dyn_{g}", f"stride_um_{g}",
                            f"stride_bn_{g}", f"stride_br_{g}")})
    flags = {"G": members, "COMPUTE_DU": True, "COMPUTE_DB": True,
             **{f"R_PAD_{g}": r for g, r in enumerate(r_pads)}}
    elt = 4 if act == "fp32" else 2
    return _spec("du_db_group", cfg, arch, act, None, sig, flags,
                 f"{act} R_PAD={'+'.join(map(str, r_pads[:members]))}",
                 ceiling_target=LORA_SIDE_CEILING if cfg.large_m else 0.0,
                 trip_bytes=cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * elt,  # dy tile
                 trip_blocks=("BLOCK_M", "BLOCK_N"),
                 bounded_args=BOUNDED_ARGS + tuple(f"{name}_{g}" for g in range(4)
                                                   for name in ("b", "db")))


def _da_spec(cfg, arch, act, precision=None, r_pad=None, target=0.0, segmented=False,
             bits=False):
    """bits: the mask stored as bits for the dx GEMM (WRITE_BITS) instead of dx's term."""
    sig = {"x_ptr": f"*{act}", "du_ptr": f"*{act}", "a_ptr": f"*{act}", "ws_ptr": "*fp32",
           "da_ptr": f"*{act}", "counter_ptr": "*i32", "dx_ptr": f"*{act}",
           **_ints("M", "K", "R"), "seed_ptr": "*i64", "seed_hi": "i32", "threshold": "i64",
           "keep_scale": "fp32",
           **_ints("rows_per_split", "m_bucket", "stride_xm", "stride_xk", "stride_dum",
                   "stride_dur", "stride_ar", "stride_ak", "stride_dxm", "stride_dxk"),
           "row_seg_ptr": "*i32", "seg_thr_ptr": "*i32", "seg_keep_ptr": "*fp32",
           "bits_ptr": "*i32", "stride_bm": "i32"}
    flags = {"COMPUTE_DA": True, "WRITE_DX": not bits, "WRITE_BITS": bits, "HAS_DROPOUT": True,
             "DROPOUT_GROUPED": True, "SEGMENTED": segmented}
    elt = 4 if act == "fp32" else 2
    tile = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"]
    r_pad = r_pad or cfg.max_r_pad
    return _spec("da", cfg, arch, act, r_pad, sig, flags,
                 f"{act} R_PAD={r_pad}{' mixed' * segmented}{' bits' * bits}",
                 precision=precision, ceiling_target=target,  # x read, dx (or bits) written
                 trip_bytes=tile * elt + (tile // 8 if bits else tile * elt),
                 trip_blocks=("BLOCK_M", "BLOCK_K"))


# Every shipped config x arch x activation class (fp16 compiles as bf16), each at its worst
# case: double quantisation on, dropout on, K aligned (vectorised decode) and not (per-element
# decode), the largest R_PAD the config ships for.
COMPILE_SPECS = sibling_specs(SIBLING_FIXES, (
    [_dx_spec(c, arch, "fp32" if fp32 else "bf16", ka)
     for (arch, fp32), configs in CONFIGS["dx"].items() for c in configs for ka in (True, False)
     if ka or not c.large_m]
    + [_dx_spec(c, arch, "fp16", True) for (arch, fp32), configs in CONFIGS["dx"].items()
       for c in configs if c.large_m]
    # issue 30: a group's dx GEMM on the dx kernel's sm_80 configs (16-bit and tf32), where it
    # runs (GROUP_DX_TARGETS)
    + [_dx_group_spec(c, arch, "fp32" if fp32 else "bf16")
       for (arch, fp32), configs in CONFIGS["dx"].items() if arch == "sm_80"
       for c in configs]
    # issue 30: a group's dU/dB pass (16-bit), 2 to 4 members
    + [_du_db_group_spec(c, arch, "bf16", g)
       for (arch, _), configs in CONFIGS["du_db_group"].items() for c in configs
       for g in GROUP_R_PADS]
    # issue 11: the large_m du_db / da configs at R_PAD 16 and their largest, bf16 and fp16
    + [spec(c, arch, act, r_pad=r, target=LORA_SIDE_CEILING)
       for name, spec in (("du_db", _du_db_spec), ("da", _da_spec))
       for (arch, fp32), configs in CONFIGS[name].items() if not fp32
       for c in configs if c.large_m for act in ("bf16", "fp16")
       for r in sorted({16, c.max_r_pad})]
    + [_du_db_spec(c, arch, "fp32" if fp32 else "bf16")
       for (arch, fp32), configs in CONFIGS["du_db"].items() for c in configs
       if fp32 or not c.large_m]  # the large_m ones: gated below
    + [_da_spec(c, arch, "fp32" if fp32 else "bf16")
       for (arch, fp32), configs in CONFIGS["da"].items() for c in configs
       if fp32 or not c.large_m]
    # dropout's mask as bits for the dx GEMM, where it takes them (DROPOUT_BITS_TARGETS)
    + [_da_spec(c, arch, "bf16", bits=True)
       for (arch, fp32), configs in CONFIGS["da"].items() for c in configs
       if not fp32 and arch in DROPOUT_BITS_TARGETS]
    # issue 14: a mixed batch's masked dU and per-row dropout (4 or 16 adapters of rank 16)
    + [spec(c, arch, "bf16", r_pad=r, segmented=True)
       for name, spec in (("du_db", _du_db_spec), ("da", _da_spec))
       for (arch, fp32), configs in CONFIGS[name].items() if not fp32
       for c in configs if c.large_m for r in sorted({64, c.max_r_pad})]
    # fp32 at full precision: FMA dots, no tensor-core instruction (IEEE_CONFIGS)
    + [_dx_spec(c, arch, "fp32", ka, "ieee")
       for arch, configs in IEEE_CONFIGS["dx"].items() for c in configs for ka in (True, False)]
    + [_du_db_spec(c, arch, "fp32", "ieee")
       for arch, configs in IEEE_CONFIGS["du_db"].items() for c in configs]
    + [_da_spec(c, arch, "fp32", "ieee")
       for arch, configs in IEEE_CONFIGS["da"].items() for c in configs]
    # blocksize 32: BLOCK_K 64 or 128 decodes 2 or 4 absmax sub-blocks per row (vectorised path)
    + [_dx_spec(c, arch, "fp32" if fp32 else "bf16", True, qblock=32)
       for (arch, fp32), configs in CONFIGS["dx"].items() for c in configs
       if c.kwargs["BLOCK_K"] > 32]
    + [_dx_spec(c, arch, "fp32", True, "ieee", qblock=32)
       for arch, configs in IEEE_CONFIGS["dx"].items() for c in configs
       if c.kwargs["BLOCK_K"] > 32]
))
