"""Backward of the QLoRA layer (DESIGN.md, "The math"), three kernels and a reduction:

    _lora_bwd_du_db_kernel   dU = s * dy @ B  and  dB = s * dy^T @ U   in one pass over dy
    _lora_bwd_reduce_kernel  fixed-order sum of fp32 partials (dU, dB, dA), times a scale
    _nf4_lora_bwd_dx_kernel  dx = dy @ deq(W) + dropout'(dU @ A)   W read packed, never [N, K]
    _lora_bwd_da_kernel      dA = dU^T @ dropout(x)                mask regenerated from the seed

Determinism: dB and dA are sums over M. Rather than atomics (whose order varies run to run),
M is cut into a fixed number of splits; each program writes its split's fp32 partial to a
workspace it alone owns, and _lora_bwd_reduce_kernel adds the partials in split order. The same
inputs and the same config give bit-identical gradients. dU is a sum over N, cut the same way
into column groups so that one pass over dy can fill the GPU at every shape.

Orientation: the dx kernel accumulates dx^T tiles [BLOCK_K, BLOCK_M] = deq(W)^T @ dy^T, so the
decoded weight tile (made in registers) is tl.dot's FIRST operand; on sm_90 wgmma then takes it
from registers, and dy comes through shared memory (DESIGN.md, "Compilation"). The dA kernel
does the same with the masked x tile (dA^T = dropout(x)^T @ dU).

Precision: elementwise math in fp32 (also because the interpreter computes bf16 elementwise
math on bit patterns); tl.dot takes operands in the activation dtype and accumulates in fp32;
fp32 activations use DOT_PRECISION ("tf32" or "ieee", the launcher follows
torch.backends.cuda.matmul.allow_tf32). Row offsets are int64: M * stride passes 2^31 at
M * K > 2^31 (e.g. 512k tokens x 4096).

Configs: CONFIGS[kernel][arch] lists what the GPU autotunes over (pruned by `prune_configs`),
INTERPRETER_CONFIGS the one fixed config used in Triton's CPU interpreter, COMPILE_SPECS every
shipped config x arch for fastlora.compile_report().
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import CompileSpec, decode_weight, dropout_keep

MAX_RANK = 256  # rank is padded to a power of two R_PAD in [16, 256]


@triton.jit
def _lora_bwd_du_db_kernel(dy_ptr, u_ptr, b_ptr, ws_du_ptr, ws_db_ptr,
                           M, N, R, rows_per_split, cols_per_group, m_bucket,
                           stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br,
                           COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr,
                           R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unscaled fp32 partials of dU = dy @ B and dB = dy^T @ U over one (row split, column group).

    dy_ptr  fp16/bf16/fp32 [M, N]      u_ptr [M, R], b_ptr [N, R], both in dy's dtype
    ws_du_ptr fp32 [G, M, R]  ws_du[g] = dy[:, cols of group g] @ B[cols of group g]
    ws_db_ptr fp32 [S, N, R]  ws_db[s] = dy[rows of split s]^T @ U[rows of split s]
    Program (s, g) walks its rows block by block (outer) and its columns (inner): the dU tile
    stays in registers across the inner loop; the dB tile of each column block is added into
    ws_db[s], which only this program touches, in row order (first row block: plain store).
    m_bucket: unused here, part of the autotune key.
    """
    tl.static_assert(R_PAD >= 16, "tl.dot needs every dimension >= 16: pad the rank")
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M is dU's dot M and dB's dot K: >= 16")
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
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
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
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
                prev = tl.load(ws, mask=tile_mask & (m0 > row_start), other=0.0)
                tl.store(ws, prev + part, mask=tile_mask)
        if COMPUTE_DU:
            ws = ws_du_ptr + (pid_g.to(tl.int64) * M + rows[:, None]) * R + offs_r[None, :]
            tl.store(ws, du, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_bwd_reduce_kernel(ws_ptr, out_ptr, parts, n, scale, BLOCK: tl.constexpr):
    """out[i] = scale * sum_j ws[j, i], j = 0, 1, ..., parts - 1 in that order (deterministic),
    summed in fp32 and rounded once.

    ws_ptr fp32 [parts, n]; out_ptr fp16/bf16/fp32 [n] (a contiguous dU, dB or dA)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, parts):
        acc += tl.load(ws_ptr + j * n + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_lora_bwd_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            code_ptr, dx_ptr, M, N, K, m_bucket,
                            stride_dym, stride_dyn, stride_dxm, stride_dxk,
                            QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx += dy @ deq(W), one [BLOCK_M, BLOCK_K] tile of dx per program, W read packed.

    dy_ptr fp16/bf16/fp32 [M, N]; packed_ptr .. code_ptr: the 4-bit W [N, K] (common.py);
    dx_ptr [M, K] in dy's dtype, holding dropout'(dU @ A) on entry (_lora_bwd_da_kernel wrote
    it): it is the accumulator's initial value, so the LoRA term and dy @ deq(W) are summed in
    one fp32 accumulator and dx is rounded once more at the store. m_bucket: unused here, part
    of the autotune key.

    The loop decodes each [BLOCK_K, BLOCK_N] tile of W^T in registers from the packed bytes,
    never an [N, K] buffer; blocks may straddle rows and K may be odd: decode_weight works on
    flat indices n * K + k.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16,
                     "tl.dot needs every dimension >= 16")
    act = dx_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    # L2 grouping (Triton tutorial 03): GROUP_M row tiles sweep the K tiles together, so a
    # column band of W is decoded for GROUP_M row tiles while it is still in L2.
    group = GROUP_M * num_k
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_k = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    dx_ptrs = dx_ptr + cols[:, None] * stride_dxk + rows[None, :] * stride_dxm
    dx_mask = k_mask[:, None] & m_mask[None, :]
    acc = tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)  # dx^T tile
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + rows[None, :] * stride_dym,
                       mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        flat = offs_n.to(tl.int64)[None, :] * K + cols[:, None]
        w_t = decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            code_ptr, flat, k_mask[:, None] & n_mask[None, :], QBLOCK,
                            DOUBLE_QUANT)
        acc = tl.dot(w_t.to(act), dy_t, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptrs, acc.to(act), mask=dx_mask)


@triton.jit
def _lora_bwd_da_kernel(x_ptr, du_ptr, a_ptr, ws_ptr, dx_ptr, M, K, R, seed, threshold,
                        keep_scale, rows_per_split, m_bucket, stride_xm, stride_xk, stride_dum,
                        stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
                        COMPUTE_DA: tl.constexpr, WRITE_DX: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """The two products that need the dropout mask, which is drawn here once for both:
    the fp32 partial of dA = dU^T @ dropout(x) over one row split (COMPUTE_DA), and dx's LoRA
    term dropout'(dU @ A) (WRITE_DX), for one column tile.

    x_ptr fp16/bf16/fp32 [M, K] (any strides); du_ptr [M, R] (scaled by s), a_ptr [R, K], in
    x's dtype; ws_ptr fp32 [S, R, K]: ws[s] = dU[rows of s]^T @ dropout(x)[rows of s];
    dx_ptr [M, K] in x's dtype: receives dropout'(dU @ A), which _nf4_lora_bwd_dx_kernel then
    takes as its accumulator's initial value.
    The mask is regenerated from (seed, m * K + k), as the forward drew it; the masked x tile is
    rounded to x's dtype (what the forward fed its dot) and is the first dot operand
    (dA^T = dropout(x)^T @ dU). Drawing the mask here rather than in the dx kernel keeps
    Philox's per-element state out of the big GEMM's registers (it spilled there, hundreds of
    bytes at 128 x 128 tiles). m_bucket: unused here, part of the autotune key.
    """
    tl.static_assert(R_PAD >= 16 and BLOCK_M >= 16 and BLOCK_K >= 16,
                     "tl.dot needs every dimension >= 16")
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_mask = offs_k < K
    r_mask = offs_r < R
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
            keep = dropout_keep(seed, offs_m, offs_k, K, threshold)
        if COMPUTE_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=tile_mask, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(act)
            acc = tl.dot(tl.trans(x), du, acc, input_precision=DOT_PRECISION)
        if WRITE_DX:
            lora = tl.dot(du, a, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                lora = tl.where(keep, lora * keep_scale, 0.0)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     lora.to(act), mask=tile_mask)
    if COMPUTE_DA:
        ws = ws_ptr + (pid_s.to(tl.int64) * R + offs_r[None, :]) * K + offs_k[:, None]
        tl.store(ws, acc, mask=k_mask[:, None] & r_mask[None, :])


# ----------------------------------------------------------------------------- configs

def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# What the GPU autotunes over, per kernel and arch. Reasoning, for M = 8192, 4096 x 14336, r=16:
# - dx is the GEMM (2*M*N*K flops); its tiles follow the forward's: 128-wide on the MMA's
#   M side (BLOCK_K here), BLOCK_N = 32/64 keeps the decoded tile (fp32 code * scale
#   products) small enough not to spill next to the accumulator.
# - du_db reads dy once (memory-bound: 2*M*N bytes), so its tiles are sized for registers:
#   the dU accumulator is [BLOCK_M, R_PAD] fp32, pruned against R_PAD.
# - da reads x once; its accumulator [BLOCK_K, R_PAD] fp32 likewise.
# - reduce is elementwise over the small dU / dB / dA (not autotuned).
CONFIGS = {
    "dx": {
        "sm_80": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                  _cfg(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "sm_90": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
                  _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
                  _cfg(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
    },
    "du_db": {
        "sm_80": [_cfg(4, 3, BLOCK_M=64, BLOCK_N=64), _cfg(4, 3, BLOCK_M=32, BLOCK_N=128),
                  _cfg(8, 2, BLOCK_M=32, BLOCK_N=32)],
        "sm_90": [_cfg(4, 3, BLOCK_M=64, BLOCK_N=64), _cfg(8, 3, BLOCK_M=64, BLOCK_N=128),
                  _cfg(8, 2, BLOCK_M=32, BLOCK_N=32)],
    },
    "da": {
        "sm_80": [_cfg(4, 3, BLOCK_M=64, BLOCK_K=64), _cfg(4, 3, BLOCK_M=32, BLOCK_K=128),
                  _cfg(8, 2, BLOCK_M=32, BLOCK_K=32)],
        "sm_90": [_cfg(4, 3, BLOCK_M=64, BLOCK_K=64), _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
                  _cfg(8, 2, BLOCK_M=32, BLOCK_K=32)],
    },
}

# The interpreter runs one fixed small config (the autotuner would time every config there).
INTERPRETER_CONFIGS = {
    "dx": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4),
    "du_db": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32),
    "da": _cfg(4, 1, BLOCK_M=32, BLOCK_K=64),
}

REDUCE_BLOCK = 1024  # elementwise: 8 fp32 per thread at 4 warps
REDUCE_WARPS = 4

# fp32 accumulator elements per thread that leave room for the operands (65536 registers per
# SM, 255 per thread): the rank-wide accumulators of du_db ([BLOCK_M, R_PAD] + the dB tile
# [BLOCK_N, R_PAD]) and da ([BLOCK_K, R_PAD]).
_ACC_PER_THREAD = 64


def _rank_fits(kernel: str, config: triton.Config, r_pad: int) -> bool:
    kw, threads = config.kwargs, 32 * config.num_warps
    if kernel == "du_db":
        return (kw["BLOCK_M"] + kw["BLOCK_N"]) * r_pad <= _ACC_PER_THREAD * threads
    if kernel == "da":
        return kw["BLOCK_K"] * r_pad <= _ACC_PER_THREAD * threads
    return True


def prune_configs(kernel: str, configs, m_bucket: int, r_pad: int):
    """Configs worth timing for this problem: rank-wide accumulators that fit in registers,
    and no row tile more than twice the (bucketed) M. Falls back to the smallest config."""
    keep = [c for c in configs if _rank_fits(kernel, c, r_pad)
            and c.kwargs["BLOCK_M"] <= max(32, 2 * m_bucket)]
    if keep:
        return keep
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_warps * -1))]


def _early_prune(kernel):
    def prune(configs, named_args, **kwargs):
        return prune_configs(kernel, configs, named_args["m_bucket"],
                             kwargs.get("R_PAD", 16))
    return prune


_KEYS = {"dx": ["m_bucket", "N", "K", "QBLOCK", "DOUBLE_QUANT", "HAS_DROPOUT"],
         "du_db": ["m_bucket", "N", "R_PAD", "COMPUTE_DU", "COMPUTE_DB"],
         "da": ["m_bucket", "K", "R_PAD", "HAS_DROPOUT"]}
KERNELS = {"dx": _nf4_lora_bwd_dx_kernel, "du_db": _lora_bwd_du_db_kernel,
           "da": _lora_bwd_da_kernel}
_tuned: dict = {}


def autotuned(kernel: str, arch: str):
    """The autotuned launcher of `kernel` over CONFIGS[kernel][arch] (built on first use).
    du_db adds into its workspace, but only after a plain store on its first row block, so
    re-running it while timing configs leaves the same result."""
    if (kernel, arch) not in _tuned:
        _tuned[kernel, arch] = triton.autotune(
            configs=CONFIGS[kernel][arch], key=_KEYS[kernel],
            prune_configs_by={"early_config_prune": _early_prune(kernel)})(KERNELS[kernel])
    return _tuned[kernel, arch]


# ----------------------------------------------------------------------------- compile specs

# Ranks the specs are compiled at: the rank-wide tiles of du_db / da scale with R_PAD.
_SPEC_RANKS = (16, 64, 256)


def _dx_spec(cfg, arch, act, double_quant):
    sig = {"dy_ptr": f"*{act}", "packed_ptr": "*u8",
           "absmax_ptr": "*u8" if double_quant else "*fp32", "absmax2_ptr": "*fp32",
           "code2_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
           "dx_ptr": f"*{act}", "M": "i32", "N": "i32", "K": "i32", "m_bucket": "i32",
           **{s: "i32" for s in ("stride_dym", "stride_dyn", "stride_dxm", "stride_dxk")}}
    consts = {"QBLOCK": 64, "DOUBLE_QUANT": double_quant,
              "DOT_PRECISION": "tf32" if act == "fp32" else "ieee", **cfg.kwargs}
    return CompileSpec(kernel="_nf4_lora_bwd_dx_kernel", fn=_nf4_lora_bwd_dx_kernel,
                       signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, archs=(arch,),
                       label=f"{act} dq={int(double_quant)}", options={"enable_fp_fusion": False})


def _du_db_spec(cfg, arch, act, r_pad):
    sig = {"dy_ptr": f"*{act}", "u_ptr": f"*{act}", "b_ptr": f"*{act}", "ws_du_ptr": "*fp32",
           "ws_db_ptr": "*fp32", **{a: "i32" for a in (
               "M", "N", "R", "rows_per_split", "cols_per_group", "m_bucket", "stride_dym",
               "stride_dyn", "stride_um", "stride_ur", "stride_bn", "stride_br")}}
    consts = {"COMPUTE_DU": True, "COMPUTE_DB": True, "R_PAD": r_pad,
              "DOT_PRECISION": "tf32" if act == "fp32" else "ieee", **cfg.kwargs}
    return CompileSpec(kernel="_lora_bwd_du_db_kernel", fn=_lora_bwd_du_db_kernel,
                       signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, archs=(arch,), label=f"{act} R_PAD={r_pad}")


def _da_spec(cfg, arch, act, r_pad):
    sig = {"x_ptr": f"*{act}", "du_ptr": f"*{act}", "a_ptr": f"*{act}", "ws_ptr": "*fp32",
           "dx_ptr": f"*{act}", "M": "i32", "K": "i32", "R": "i32", "seed": "i64",
           "threshold": "i64", "keep_scale": "fp32", "rows_per_split": "i32", "m_bucket": "i32",
           **{s: "i32" for s in ("stride_xm", "stride_xk", "stride_dum", "stride_dur",
                                 "stride_ar", "stride_ak", "stride_dxm", "stride_dxk")}}
    consts = {"COMPUTE_DA": True, "WRITE_DX": True, "HAS_DROPOUT": True, "R_PAD": r_pad,
              "DOT_PRECISION": "tf32" if act == "fp32" else "ieee", **cfg.kwargs}
    return CompileSpec(kernel="_lora_bwd_da_kernel", fn=_lora_bwd_da_kernel, signature=sig,
                       constexprs=consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       archs=(arch,), label=f"{act} R_PAD={r_pad}")


def _reduce_spec(out):
    return CompileSpec(kernel="_lora_bwd_reduce_kernel", fn=_lora_bwd_reduce_kernel,
                       signature={"ws_ptr": "*fp32", "out_ptr": f"*{out}", "parts": "i32",
                                  "n": "i32", "scale": "fp32"},
                       constexprs={"BLOCK": REDUCE_BLOCK}, num_warps=REDUCE_WARPS, num_stages=1,
                       uses_dot=False, label=f"out={out}")


def _compile_specs():
    specs = []
    for arch in ("sm_80", "sm_90"):
        for act in ("bf16", "fp32"):  # fp16 compiles like bf16; fp32 is the tf32 path
            specs += [_dx_spec(c, arch, act, dq) for c in CONFIGS["dx"][arch]
                      for dq in (True, False)]
            for r_pad in _SPEC_RANKS:
                specs += [_du_db_spec(c, arch, act, r_pad)
                          for c in prune_configs("du_db", CONFIGS["du_db"][arch], 8192, r_pad)]
                specs += [_da_spec(c, arch, act, r_pad)
                          for c in prune_configs("da", CONFIGS["da"][arch], 8192, r_pad)]
    return specs + [_reduce_spec(out) for out in ("bf16", "fp16", "fp32")]


COMPILE_SPECS = _compile_specs()
