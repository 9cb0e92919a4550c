"""The fused forward for M <= 16 rows (decoding, generation in RL loops): y = x @ deq(W)^T +
s * U @ B^T + bias, with U from forward._lora_u_kernel.

With at most 16 rows the layer is bound by reading the packed weight (0.5 byte a value), so the
grid is shaped like a GEMV: one program per (BLOCK_N rows of W, K slice). Every packed byte is
read by exactly one program, once. Split-K gives the grid enough programs to fill the GPU when
N alone would not (N = 4096 with BLOCK_N = 64 is 64 programs for 132 SMs); the partial sums go
to an fp32 workspace [SPLIT_K, M, N], and the last of an N tile's programs to finish
(common.last_to_arrive) adds them in slice order (deterministic: no atomics on the values), then
the LoRA term and the bias, in the same launch. With one slice the program finishes the tile
itself. A forward at M <= 16 is two launches: U (forward._lora_u_kernel) and this kernel.

The product still runs on tensor cores (tl.dot with the 16 padded rows as the narrow operand):
on sm_90 the decoded weight tile is wgmma's register operand (y^T = W_tile @ x^T, as in
forward.py) and x^T the 16-wide shared-memory operand; the MMA is a few percent of the time
next to the decode, which is what the CUDA cores spend their cycles on either way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (BOUNDED_ARGS, CompileSpec, SiblingFix, by_triton, decode_tile, lane_table,
                     last_to_arrive, load_x_tile, sibling_configs, sibling_specs,
                     weight_signature)
from .forward import lora_init, store_y

BLOCK_M = 16  # rows handled by one program: M <= 16, padded (tl.dot's minimum)


@triton.jit
def _nf4_lora_fwd_small_m_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                 offset_ptr, code_ptr, u_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr,
                                 counter_ptr, M, N, K, R, k_per_split,
                                 stride_xm, stride_xk, stride_um, stride_ur, stride_bn,
                                 stride_br, stride_ym, stride_yn, scaling,
                                 QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                                 K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 LANE_TABLE: tl.constexpr):
    """Program (n, s) computes y^T[n-tile, :M] over K slice s = [s * k_per_split, +k_per_split).

    x_ptr [M, K] (any strides), u_ptr [M, R], b_ptr [N, R], bias_ptr [N], y_ptr [M, N]: x's
    dtype; weight pointers as in common.py. SPLIT (constexpr: more than one K slice):
    ws_ptr fp32 [n_slices, M, N] receives the partial sums, and the last of an N tile's
    n_slices programs to arrive at counter_ptr[n] (int32 [N tiles], zero) sums them in slice
    order, adds s * U @ B^T and the bias and writes y; otherwise the program writes y itself
    (ws_ptr, counter_ptr unused). k_per_split is a multiple of BLOCK_K, so slices start on
    tile boundaries."""
    _small_m_tile(tl.program_id(0), tl.program_id(1), tl.num_programs(1), x_ptr, packed_ptr,
                  absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                  lane_table(code_ptr, LANE_TABLE), u_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr,
                  counter_ptr, M, N, K, R, k_per_split, stride_xm, stride_xk, stride_um,
                  stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling, QBLOCK,
                  DOUBLE_QUANT, K_ALIGNED, HAS_BIAS, PRECISION, BLOCK_R, SPLIT, BLOCK_M,
                  BLOCK_N, BLOCK_K, LANE_TABLE)


@triton.jit
def _nf4_lora_fwd_small_m_group_kernel(
        x_ptr, ws_ptr, counter_ptr, M, K, k_per_split, stride_xm, stride_xk,
        packed0, absmax0, absmax2_0, code2_0, offset0, table0, u0, b0, bias0, y0, N0, R0,
        stride_um0, stride_ur0, stride_bn0, stride_br0, stride_ym0, stride_yn0, scaling0,
        packed1, absmax1, absmax2_1, code2_1, offset1, table1, u1, b1, bias1, y1, N1, R1,
        stride_um1, stride_ur1, stride_bn1, stride_br1, stride_ym1, stride_yn1, scaling1,
        packed2, absmax2, absmax2_2, code2_2, offset2, table2, u2, b2, bias2, y2, N2, R2,
        stride_um2, stride_ur2, stride_bn2, stride_br2, stride_ym2, stride_yn2, scaling2,
        packed3, absmax3, absmax2_3, code2_3, offset3, table3, u3, b3, bias3, y3, N3, R3,
        stride_um3, stride_ur3, stride_bn3, stride_br3, stride_ym3, stride_yn3, scaling3,
        G: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        K_ALIGNED: tl.constexpr, HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr,
        HAS_BIAS2: tl.constexpr, HAS_BIAS3: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LANE_TABLE: tl.constexpr):
    """The small-M product of G (2..4) members that read the same x (a q/k/v or gate/up
    group, issue 29) in one launch: the members' N tiles side by side along program axis 0
    (member g's tiles after members 0..g-1's), each program running what
    _nf4_lora_fwd_small_m_kernel's program runs for its member's tile, on that member's
    weight, code table (NF4 or FP4: table_g, each member its own), U, B, bias and y (same K,
    quantisation blocksize and double quantisation; BLOCK_R covers the largest rank).
    ws_ptr fp32 [n_slices, M, N0 + .. + N{G-1}]: member g's partials in its own
    [n_slices, M, Ng] block after the blocks before it; counter_ptr int32, one per tile of the
    whole grid. Slots past G repeat slot 0's arguments (unread)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_slices = tl.num_programs(1)
    t1 = tl.cdiv(N0, BLOCK_N)
    t2 = t1 + tl.cdiv(N1, BLOCK_N)
    t3 = t2 + tl.cdiv(N2, BLOCK_N)
    slice_rows = n_slices * M  # rows of one member's workspace block, per column
    if pid < t1:
        _small_m_tile(pid, pid_k, n_slices, x_ptr, packed0, absmax0, absmax2_0, code2_0,
                      offset0, lane_table(table0, LANE_TABLE), u0, b0, bias0, y0, ws_ptr,
                      counter_ptr, M, N0, K, R0, k_per_split, stride_xm, stride_xk,
                      stride_um0, stride_ur0, stride_bn0, stride_br0, stride_ym0, stride_yn0,
                      scaling0, QBLOCK, DOUBLE_QUANT, K_ALIGNED, HAS_BIAS0, PRECISION,
                      BLOCK_R, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, LANE_TABLE)
    elif pid < t2:
        _small_m_tile(pid - t1, pid_k, n_slices, x_ptr, packed1, absmax1, absmax2_1, code2_1,
                      offset1, lane_table(table1, LANE_TABLE), u1, b1, bias1, y1,
                      ws_ptr + slice_rows.to(tl.int64) * N0, counter_ptr + t1, M, N1, K, R1,
                      k_per_split, stride_xm, stride_xk, stride_um1, stride_ur1, stride_bn1,
                      stride_br1, stride_ym1, stride_yn1, scaling1, QBLOCK, DOUBLE_QUANT,
                      K_ALIGNED, HAS_BIAS1, PRECISION, BLOCK_R, SPLIT, BLOCK_M, BLOCK_N,
                      BLOCK_K, LANE_TABLE)
    else:
        if G > 2:
            if pid < t3:
                _small_m_tile(pid - t2, pid_k, n_slices, x_ptr, packed2, absmax2, absmax2_2,
                              code2_2, offset2, lane_table(table2, LANE_TABLE), u2, b2,
                              bias2, y2,
                              ws_ptr + slice_rows.to(tl.int64) * (N0 + N1), counter_ptr + t2,
                              M, N2, K, R2, k_per_split, stride_xm, stride_xk, stride_um2,
                              stride_ur2, stride_bn2, stride_br2, stride_ym2, stride_yn2,
                              scaling2, QBLOCK, DOUBLE_QUANT, K_ALIGNED, HAS_BIAS2, PRECISION,
                              BLOCK_R, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, LANE_TABLE)
            else:
                if G > 3:
                    _small_m_tile(pid - t3, pid_k, n_slices, x_ptr, packed3, absmax3,
                                  absmax2_3, code2_3, offset3,
                                  lane_table(table3, LANE_TABLE), u3, b3, bias3, y3,
                                  ws_ptr + slice_rows.to(tl.int64) * (N0 + N1 + N2),
                                  counter_ptr + t3, M, N3, K, R3, k_per_split, stride_xm,
                                  stride_xk, stride_um3, stride_ur3, stride_bn3, stride_br3,
                                  stride_ym3, stride_yn3, scaling3, QBLOCK, DOUBLE_QUANT,
                                  K_ALIGNED, HAS_BIAS3, PRECISION, BLOCK_R, SPLIT, BLOCK_M,
                                  BLOCK_N, BLOCK_K, LANE_TABLE)


@triton.jit
def _small_m_tile(pid_n, pid_k, n_slices, x_ptr, packed_ptr, absmax_ptr, absmax2_ptr,
                  code2_ptr, offset_ptr, table, u_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr,
                  counter_ptr, M, N, K, R, k_per_split, stride_xm, stride_xk, stride_um,
                  stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                  QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, LANE_TABLE: tl.constexpr):
    """One program of the small-M product: N tile pid_n of one weight, K slice pid_k of
    n_slices (the kernels' docstrings say the arguments)."""
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = pid_k * k_per_split
    if SPLIT:  # the last program of the tile adds the LoRA term and the bias
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
    else:
        acc = lora_init(offs_m, offs_n, M, N, R, u_ptr, b_ptr, stride_um, stride_ur, stride_bn,
                        stride_br, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, True)
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        w = decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                        offs_n, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, DOUBLE_QUANT, K_ALIGNED,
                        LANE_TABLE)
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc, input_precision=PRECISION)
    if SPLIT:
        ws_ptrs = (ws_ptr + (pid_k * M + offs_m).to(tl.int64)[None, :] * N
                   + offs_n[:, None])
        mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        tl.store(ws_ptrs, acc, mask=mask)
        if last_to_arrive(counter_ptr + pid_n, n_slices):
            acc = lora_init(offs_m, offs_n, M, N, R, u_ptr, b_ptr, stride_um, stride_ur,
                            stride_bn, stride_br, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
                            True)
            ws_ptrs = ws_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
            for _ in range(0, n_slices):  # slice order
                acc += tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ws_ptrs += M * N  # M <= 16: no overflow before N passes 2^27
            store_y(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS,
                    True)
    else:
        store_y(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS, True)


# ----------------------------------------------------------------------------- configs

# K slices are whole multiples of SPLIT_GRANULE values, a multiple of every config's BLOCK_K,
# so the autotuner can try any config on the same slicing.
SPLIT_GRANULE = 256
# The modelled HBM share (packed-weight bytes) every 16-bit K-aligned small-M config is gated
# at: a floor under what the register-table decode reaches (0.37-0.44 on sm_80 / sm_90, from
# ~0.25 with the table gathered through memory), NOT issue 10's 0.75. Why short: the loop is
# bound by the shared-memory pipe, where each value costs one warp shuffle (1/32 clock) and
# its trip through shared memory into the MMA operand layout (2 x 2 B at 128 B per clock),
# 2/32 clock against the 0.036 clock its 0.5 byte takes at HBM speed.
# Triton 3.8 compiles the sm_90 loop at padded rank 64 to more instructions (0.31-0.35 there,
# 0.38-0.45 on 3.5-3.7 and 3.9; sm_80 unchanged): its floor is 0.30, so the gate still catches
# a regression on that release instead of failing on its codegen. Issue 28's corrected model
# adds the wgmma's shared-memory operand reads (16 clocks a trip at 64x64 w4): on 3.8 that
# puts sm_90 at 0.2999, so its floor is 0.29 there (3.9: 0.36-0.42, over 0.35).
HBM_FLOOR = by_triton(0.35, v3_8=0.29)

# Interpreter: 32-wide tiles and two K slices keep test shapes at a handful of programs and
# still run the split-K reduction.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4,
                      "num_stages": 1}


def split_k(m: int, n: int, k: int, num_sms: int, block_n: int = 64) -> int:
    """How many K slices: enough programs for ~4 per SM, capped so the fp32 workspace traffic
    (written and read: 8 * M * N bytes a slice) stays under a quarter of the packed weight's
    N * K / 2 bytes (slices <= K / (64 M)), and at most one slice per SPLIT_GRANULE of K."""
    programs_n = triton.cdiv(n, block_n)
    wanted = triton.cdiv(4 * num_sms, programs_n)
    cap = max(1, k // (64 * m))
    return max(1, min(wanted, cap, triton.cdiv(k, SPLIT_GRANULE)))


def _cfg(bn, bk, warps, stages):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


# Autotune lists (both archs: the weight tile is the first tl.dot operand everywhere). Each
# BLOCK_K divides SPLIT_GRANULE. All compile with zero spill bytes (COMPILE_SPECS) and fit
# sm_80's 163 KB of shared memory; dropped after measuring: BLOCK_K = 256 (392-688 B spilled),
# 128x128 at 3 stages (208 KB of shared memory).
SMALL_M_CONFIGS = [_cfg(64, 64, 4, 4), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3),
                   _cfg(64, 128, 4, 3), _cfg(128, 64, 4, 4)]
SMALL_M_FP32_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 128, 4, 2)]
# K % QBLOCK != 0: per-element gathers, staged per pipeline stage (forward.UNALIGNED_CONFIGS):
# one small config, not tuned.
UNALIGNED_CONFIG = _cfg(32, 64, 4, 2)
# fp32 at full precision (PRECISION "ieee"): tl.dot on the FMA units, no tensor cores
# (forward.SM90_IEEE_CONFIGS says why the registers grow). SMALL_M_FP32_CONFIGS[1] (64x128 w4)
# spills 560 B on sm_90 there; spill-free (fp32 registers, split / no split, sm_80 | sm_90):
# 64x64 w4 s3 and s4 128/168 | 193/128, 128x32 w4 143/168 | 128/168, 32x128 w4 196/194 |
# 198/198. Dropped: 128x64 w8 (16 B on sm_90), 128x64 w4 (560 B on sm_90, 8 B on sm_80).
# UNALIGNED_CONFIG holds at full precision too (72-96 registers). Triton 3.6 to 3.8: with the
# split-K sum in-kernel, 64x64 w4 s3 and s4 spill 8 B on sm_90 (split; caught by CI's
# support-range rotation); 8 warps there are spill-free (48-78 registers; w4 s2 spills too),
# except on 3.7, where 64x64 w8 s3 and s4 spill 8 B on sm_80 at blocksize 32 (split, 64
# registers; caught the same way): 3.7 ships the two other tiles only (64-128 registers).
_W8 = ("v3_6", "v3_8")  # the releases that take 8 warps for the 64x64 tiles
SMALL_M_IEEE_CONFIGS = [c for c in (
    by_triton(_cfg(64, 64, 4, 3), v3_7=None, **dict.fromkeys(_W8, _cfg(64, 64, 8, 3))),
    by_triton(_cfg(64, 64, 4, 4), v3_7=None, **dict.fromkeys(_W8, _cfg(64, 64, 8, 4))),
    _cfg(128, 32, 4, 3), _cfg(32, 128, 4, 3)) if c is not None]

# The narrowest N tile of any list: the launcher sizes the arrival counters (one per N tile)
# for it before the autotuner picks a config.
SMALLEST_BLOCK_N = min(c["BLOCK_N"] for c in (*SMALL_M_CONFIGS, *SMALL_M_FP32_CONFIGS,
                                              *SMALL_M_IEEE_CONFIGS, UNALIGNED_CONFIG))


# On sm_80's siblings (common.SM80_SIBLINGS; Triton 3.9), the lists above without what spills
# there: 64x64 w4 s4 (the group kernel, 16-bit, no split: 8 B on sm_86 and sm_89); on sm_120
# 64x128 w4 at 3 stages (8 B, 16-bit, no split; 2 stages hold it) and at full precision the
# 64x64 w4 tiles (8 B at blocksize 32; 128x32 and 32x128 cover it). On sm_100 the same
# full-precision tiles (8 B at r 64, split) and, 16-bit, 64x64 w4 s3 (8 B at blocksize 32,
# no split; the s4 entry covers the tile).
_KERNELS = ("_nf4_lora_fwd_small_m_kernel", "_nf4_lora_fwd_small_m_group_kernel")
SIBLING_FIXES = (
    SiblingFix(_KERNELS, ("sm_86", "sm_89"), _cfg(64, 64, 4, 4), None, fp32=False),
    SiblingFix(_KERNELS, ("sm_100",), _cfg(64, 64, 4, 3), None, fp32=False),
    SiblingFix(_KERNELS, ("sm_120",), _cfg(64, 128, 4, 3), {"num_stages": 2}, fp32=False),
    SiblingFix(_KERNELS, ("sm_100", "sm_120"), {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4},
               None, ieee=True),
)


def small_m_configs(fp32: bool, k_aligned: bool = True, precision: str = "tf32",
                    arch: str = "sm_80") -> list[dict]:
    """The autotune list for compile target `arch` (sm_80's and sm_90's are the same; sm_80's
    siblings take SIBLING_FIXES); fp32 at precision 'ieee' gets SMALL_M_IEEE_CONFIGS."""
    if not k_aligned:
        configs = [UNALIGNED_CONFIG]
    elif fp32 and precision == "ieee":
        configs = SMALL_M_IEEE_CONFIGS
    else:
        configs = SMALL_M_FP32_CONFIGS if fp32 else SMALL_M_CONFIGS
    return sibling_configs(SIBLING_FIXES, _KERNELS[0], arch, configs, fp32,
                           fp32 and precision == "ieee")


def prune_configs(configs, named_args, **kwargs):
    """triton.autotune early_config_prune: BLOCK_K <= 4 * QBLOCK (at most 4 absmax loads per
    row and step); the smallest BLOCK_K survives when nothing passes."""
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= 4 * kwargs["QBLOCK"]]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]


def _spec(cfg, dtype, k_aligned, split, precision="tf32", qblock=64, target=0.0):
    from .forward import ALIGNED_ARGS, UNIT_STRIDES

    fma = dtype == "fp32" and precision == "ieee"
    sig = {"x_ptr": f"*{dtype}", **weight_signature(True), "u_ptr": f"*{dtype}",
           "b_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           "ws_ptr": "*fp32", "counter_ptr": "*i32",
           **{n: "i32" for n in ("M", "N", "K", "R", "k_per_split", "stride_xm", "stride_um",
                                 "stride_bn", "stride_ym")}, "scaling": "fp32"}
    constexprs = {"QBLOCK": qblock, "DOUBLE_QUANT": True, "K_ALIGNED": k_aligned,
                  "LANE_TABLE": True,
                  "HAS_BIAS": True,
                  "PRECISION": precision, "BLOCK_R": 64, "SPLIT": split, "BLOCK_M": BLOCK_M,
                  "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], **UNIT_STRIDES}
    return CompileSpec(kernel="_nf4_lora_fwd_small_m_kernel", fn=_nf4_lora_fwd_small_m_kernel,
                       signature=sig, constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"],
                       label=f"{dtype} k_aligned={int(k_aligned)} split={int(split)}"
                             f"{' ieee' * fma}{f' bs{qblock}' if qblock != 64 else ''}",
                       options={"enable_fp_fusion": False}, aligned=ALIGNED_ARGS, fma_dot=fma,
                       trip_bytes=cfg["BLOCK_N"] * cfg["BLOCK_K"] // 2,  # the packed weight
                       trip_blocks=("BLOCK_N", "BLOCK_K"), ceiling_target=target)


def _group_spec(cfg, dtype, split, members=3, target=0.0):
    """_nf4_lora_fwd_small_m_group_kernel for `members` members (K aligned, double quant,
    biases, padded rank 64, precision tf32: the group GEMM's only case, launch/group.py)."""
    from .forward import ALIGNED_ARGS

    sig = {"x_ptr": f"*{dtype}", "ws_ptr": "*fp32", "counter_ptr": "*i32",
           "M": "i32", "K": "i32", "k_per_split": "i32", "stride_xm": "i32"}
    units = {"stride_xk": 1}
    aligned = [name for name in ALIGNED_ARGS if name in sig]
    for g in range(4):
        member = {f"packed{g}": "*u8", f"absmax{g}": "*u8", f"absmax2_{g}": "*fp32",
                  f"code2_{g}": "*fp32", f"offset{g}": "*fp32", f"table{g}": "*fp32",
                  f"u{g}": f"*{dtype}",
                  f"b{g}": f"*{dtype}", f"bias{g}": f"*{dtype}", f"y{g}": f"*{dtype}",
                  f"N{g}": "i32", f"R{g}": "i32", f"stride_um{g}": "i32",
                  f"stride_bn{g}": "i32", f"stride_ym{g}": "i32", f"scaling{g}": "fp32"}
        sig.update(member)
        units.update({f"stride_ur{g}": 1, f"stride_br{g}": 1, f"stride_yn{g}": 1})
        aligned += [name for name in member if not name.startswith(("R", "scaling"))]
    constexprs = {"G": members, "QBLOCK": 64, "DOUBLE_QUANT": True, "K_ALIGNED": True,
                  **{f"HAS_BIAS{g}": True for g in range(4)}, "PRECISION": "tf32",
                  "BLOCK_R": 64, "SPLIT": split, "BLOCK_M": BLOCK_M, "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_K": cfg["BLOCK_K"], "LANE_TABLE": True, **units}
    return CompileSpec(kernel="_nf4_lora_fwd_small_m_group_kernel",
                       fn=_nf4_lora_fwd_small_m_group_kernel, signature=sig,
                       constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"],
                       label=f"{dtype} G={members} split={int(split)}",
                       options={"enable_fp_fusion": False}, aligned=tuple(aligned),
                       bounded_args=BOUNDED_ARGS + tuple(
                           f"{name}{g}" for g in range(4)
                           for name in ("bias", "b", "code2_", "offset", "absmax2_",
                                        "table")),
                       trip_bytes=cfg["BLOCK_N"] * cfg["BLOCK_K"] // 2,
                       trip_blocks=("BLOCK_N", "BLOCK_K"), ceiling_target=target)


COMPILE_SPECS = sibling_specs(SIBLING_FIXES, (
    [_spec(c, dtype, True, split, target=HBM_FLOOR) for c in SMALL_M_CONFIGS
     for split in (True, False) for dtype in ("bf16", "fp16")]
    + [_spec(c, "fp32", True, split) for c in SMALL_M_FP32_CONFIGS for split in (True, False)]
    + [_spec(UNALIGNED_CONFIG, dt, False, split) for dt in ("bf16", "fp32")
       for split in (True, False)]
    # fp32 at full precision: FMA dots, no tensor-core instruction (SMALL_M_IEEE_CONFIGS)
    + [_spec(c, "fp32", True, split, "ieee") for c in SMALL_M_IEEE_CONFIGS
       for split in (True, False)]
    + [_spec(UNALIGNED_CONFIG, "fp32", False, split, "ieee") for split in (True, False)]
    # blocksize 32: a BLOCK_K of 64 or 128 decodes 2 or 4 absmax sub-blocks per tile row
    + [_spec(c, dtype, True, split, precision, qblock=32)
       for dtype, precision, configs in (("bf16", "tf32", SMALL_M_CONFIGS),
                                         ("fp32", "tf32", SMALL_M_FP32_CONFIGS),
                                         ("fp32", "ieee", SMALL_M_IEEE_CONFIGS))
       for c in configs if c["BLOCK_K"] > 32 for split in (True, False)]
    # the group GEMM (q/k/v: 3 members; gate/up: 2), K aligned at tf32 only (launch/group.py)
    + [_group_spec(c, dtype, split, target=HBM_FLOOR if dtype != "fp32" else 0.0)
       for dtype, configs in (("bf16", SMALL_M_CONFIGS), ("fp16", SMALL_M_CONFIGS),
                              ("fp32", SMALL_M_FP32_CONFIGS))
       for c in configs for split in (True, False)]
    + [_group_spec(SMALL_M_CONFIGS[0], "bf16", True, members=2, target=HBM_FLOOR)]
))
