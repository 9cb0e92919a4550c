"""The fused forward (DESIGN.md, "The math"):

    U = dropout(x) @ A^T                       _lora_u_kernel
    y = x @ deq(W)^T + s * U @ B^T + bias      _nf4_lora_fwd_kernel

The main kernel never materialises deq(W): each K step loads the packed bytes of a
[BLOCK_N, BLOCK_K] weight tile, decodes them in registers (code[nibble] * absmax, double-quant
absmax decoded on the fly, no cached decoded absmax), casts to x's dtype and feeds tl.dot with an
fp32 accumulator. The epilogue adds s * U_tile @ B_tile^T (a second tl.dot, rank padded to a
power of two >= 16) and the bias, then stores once in x's dtype.

Tile orientation (constexpr W_FIRST): on sm_90 the kernel computes y^T tiles,
acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so the decoded weight tile is the FIRST operand of
tl.dot and wgmma reads it straight from registers (SASS `HGMMA ... R..`) instead of a
shared-memory round trip; x^T, the second operand, is read from shared memory as wgmma wants.
On sm_80 (mma.sync takes both operands from registers) the plain orientation is used.

M <= 16 goes to csrc_triton/small_m.py (split-K, reads each packed byte once).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import CompileSpec, block_scales, decode_weight, dropout_keep


# ----------------------------------------------------------------------------- device helpers

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


@triton.jit
def lora_epilogue(acc, offs_m, offs_n, M, N, R, u_ptr, b_ptr, bias_ptr, y_ptr,
                  stride_um, stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  W_FIRST: tl.constexpr):
    """Store y tile = acc + scaling * U_tile @ B_tile^T + bias once, in y's dtype.

    acc: fp32 [BLOCK_M, BLOCK_N], or its transpose [BLOCK_N, BLOCK_M] when W_FIRST.
    u_ptr [M, R], b_ptr [N, R], bias_ptr [N] in y's dtype; the rank is padded to BLOCK_R
    (a power of two >= 16, tl.dot's minimum) with zeros, so the LoRA term runs on tensor cores."""
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    u = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    if W_FIRST:
        out = acc + scaling * tl.dot(b, tl.trans(u), input_precision=PRECISION)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = (y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym
                  + offs_n.to(tl.int64)[:, None] * stride_yn)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        out = acc + scaling * tl.dot(u, tl.trans(b), input_precision=PRECISION)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = (y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym
                  + offs_n.to(tl.int64)[None, :] * stride_yn)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _lora_u_kernel(x_ptr, a_ptr, u_ptr, M, K, R,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
                   seed, threshold, keep_scale,
                   HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u = dropout(x) @ A^T, one program per BLOCK_M rows and the whole (padded) rank.

    x_ptr [M, K], a_ptr [R, K] (lora_A), u_ptr [M, R], all fp16/bf16/fp32 (x's dtype).
    Dropout keeps element (m, k) when Philox(seed, m * K + k) >= threshold (common.dropout_keep,
    reproduced by fastlora.reference) and scales kept values by keep_scale = 1 / (1 - p) in fp32,
    rounded once to x's dtype before the tl.dot: bit for bit reference.apply_dropout."""
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs the padded rank >= 16")
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, offs_k, K, threshold)
            # fp32 elementwise: the interpreter's bf16 arithmetic is wrong (DESIGN.md)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + offs_k.to(tl.int64)[:, None] * stride_ak
                      + offs_r[None, :] * stride_ar,
                      mask=(offs_k < K)[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
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
                         GROUP_M: tl.constexpr, W_FIRST: tl.constexpr):
    """y = x @ deq(W)^T + scaling * u @ B^T + bias, one program per [BLOCK_M, BLOCK_N] tile.

    x_ptr [M, K] (any strides), u_ptr [M, R], b_ptr [N, R] (lora_B), bias_ptr [N] (HAS_BIAS),
    y_ptr [M, N]: all in x's dtype (fp16/bf16/fp32); weight pointers as in common.py, the
    packed weight [N, K] flattened row-major. M_BUCKET only feeds the autotune key.
    PRECISION: tl.dot input_precision ("tf32" or "ieee"; only fp32 activations read it)."""
    tl.static_assert(QBLOCK >= 32, "bitsandbytes blocksizes start at 32")
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs the padded rank >= 16")
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # L2-friendly order (Triton tutorial 03): GROUP_M row tiles sweep the N tiles together, so
    # the weight tiles they share are read from HBM once per group, not once per row tile.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    if W_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED)
        w = w.to(x_ptr.dtype.element_ty)  # one rounding of code * absmax, as bitsandbytes
        if W_FIRST:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    lora_epilogue(acc, offs_m, offs_n, M, N, R, u_ptr, b_ptr, bias_ptr, y_ptr,
                  stride_um, stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                  HAS_BIAS, PRECISION, BLOCK_R, W_FIRST)


# ----------------------------------------------------------------------------- configs

def rank_block(rank: int) -> int:
    """BLOCK_R: the rank padded to a power of two >= 16 (tl.dot's minimum), <= 256."""
    return max(16, triton.next_power_of_2(rank))


def u_config(block_r: int) -> dict:
    """Config of _lora_u_kernel for a padded rank: the fp32 accumulator BLOCK_M x BLOCK_R stays
    at 4096 values (32 registers a thread at 4 warps) up to r = 128; r = 256 takes 8 warps."""
    block_m = max(16, min(64, 8192 // block_r))
    return {"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": 64,
            "num_warps": 8 if block_r >= 256 else 4, "num_stages": 3}


# The interpreter's config: its cost is per program instance, and 32x32x32 tiles keep the test
# shapes (M <= 100, N ~ 72, K ~ 256) at a few dozen programs. y^T orientation, as on sm_90.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "W_FIRST": True,
                      "num_warps": 4, "num_stages": 1}


def m_bucket(m: int) -> int:
    """The autotune key's M: the next power of two, 32 .. 8192 (larger M reuses 8192's pick)."""
    return min(8192, max(32, triton.next_power_of_2(m)))


# ----------------------------------------------------------------------------- tiled configs

def _cfg(bm, bn, bk, warps, stages, w_first, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
            "W_FIRST": w_first, "num_warps": warps, "num_stages": stages}


# sm_90: y^T tiles, the decoded weight tile [BLOCK_N, BLOCK_K] is wgmma's register operand
# (BLOCK_N = 64 rows per warpgroup), x^T [BLOCK_K, BLOCK_M] its shared-memory operand.
SM90_CONFIGS = [
    _cfg(128, 128, 64, 8, 3, True),
    _cfg(256, 128, 64, 8, 3, True),
    _cfg(64, 128, 64, 4, 4, True),
    _cfg(128, 64, 64, 4, 4, True),
    _cfg(32, 128, 128, 4, 4, True),
    _cfg(64, 64, 128, 4, 4, True),
]
# sm_80 (and other mma.sync GPUs): plain [BLOCK_M, BLOCK_N] tiles.
SM80_CONFIGS = [
    _cfg(128, 128, 32, 8, 3, False),
    _cfg(128, 64, 64, 4, 3, False),
    _cfg(64, 128, 64, 4, 3, False),
    _cfg(64, 64, 64, 4, 4, False),
    _cfg(32, 64, 128, 4, 4, False),
]
