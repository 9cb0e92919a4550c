"""Modelled cost of one QLoRA linear layer per provider: counted FLOPs and minimum DRAM bytes
of each kernel the provider launches, and a modelled time over a GPU's datasheet peaks.

Notation: x [M, K], W [N, K] in 4 bits, A [r, K], B [N, r], activations of e bytes (2 for
bf16/fp16). Every matmul of [a, b] @ [b, c] counts 2abc FLOPs; elementwise work counts bytes
only. A kernel's minimum bytes = each tensor it reads or writes, moved once. The 4-bit weight
moves as N*K/2 packed bytes plus its absmax: one uint8 per block and one fp32 per 256 blocks
with double quantisation (N*K/blocksize * 4 bytes without); the 16- and 256-entry code tables
(~1 KB, cache-resident) are left out. The bias is frozen (QLoRA), so it is read, never written.
fastlora's fp32 split partials (split-K of the small-M forward, the backward's dU / dB / dA
parts) are counted at their floor, one part: each launch splits into S parts chosen from the
device's SM count, which multiplies that (small) traffic by S.

Modelled time of one kernel launch (`step_seconds`), with P the datasheet tensor-core FLOP/s
and BW the datasheet DRAM B/s (the GPU table, fastlora/gpus.py, through fastlora.bench.peaks):

    fastlora kernel, GEMM-bound (KERNEL_BOUND "mma"; the tiled forward and dx GEMMs):
        max(FLOPs / (P * c), bytes / BW) + LAUNCH_OVERHEAD_S
    fastlora kernel, memory-bound (KERNEL_BOUND "hbm"; U, small-M, dU/dB, dA, ...):
        max(FLOPs / P, bytes / (BW * c)) + LAUNCH_OVERHEAD_S
    peer kernel (PEFT + bitsandbytes, dequantize + cuBLAS, the torch reference):
        max(FLOPs / (P * PEER_GEMM_EFFICIENCY), bytes / (BW * PEER_BANDWIDTH_EFFICIENCY))
        + LAUNCH_OVERHEAD_S

c is the kernel's compiled hot-loop ceiling (`kernel_ceilings`): the share of tensor-core peak
(GEMM kernels) or of HBM bandwidth (memory-bound kernels) that its SASS main loop can reach at
most, from `fastlora compile-report` (fastlora.compilecheck: issue slots and the shared-memory
pipe counted per trip, a first-order static bound). A kernel with no compiled row for the arch
and dtype class runs at c = 1.0, the ideal roofline, and the table says "unmodelled". So
fastlora is modelled no faster than its machine code allows, while the peers get their
libraries' typical efficiencies:

ASSUMPTIONS (ours, not measurements and not vendor figures): PEER_GEMM_EFFICIENCY = 0.80 of
dense tensor-core peak for cuBLAS GEMMs at training sizes; PEER_BANDWIDTH_EFFICIENCY = 0.90 of
datasheet bandwidth for bandwidth-bound kernels (bitsandbytes' dequantize, torch elementwise
ops, small-r LoRA GEMMs); LAUNCH_OVERHEAD_S = 4 us per kernel launch (launch latency plus the
ramp-up / tail of a short kernel; no CUDA graphs). No wave quantisation, perfect caching inside
a kernel, fp32 (e = 4) at the same peak as 16-bit for every provider. It is a model, not a
measurement; every number derived here is labelled "modelled", and a hot-loop ceiling is an
upper bound, so the fastlora times are lower bounds of what its code can do.
`roofline_seconds` keeps the ideal roofline (c = 1, no launch cost) for comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from .. import gpus
from .peaks import Peak, peak_of

# ---------------------------------------------------------------------- model constants
LAUNCH_OVERHEAD_S = 4e-6         # assumed per kernel launch, every provider
PEER_GEMM_EFFICIENCY = 0.80      # assumed cuBLAS share of dense tensor-core peak
PEER_BANDWIDTH_EFFICIENCY = 0.90  # assumed share of DRAM bandwidth, peers' memory-bound kernels

# fastlora's kernels (csrc_triton) and which roof their compile-report ceiling is a share of
# (the compile report's `bound`: GEMM specs carry trip_flops, memory-bound ones trip_bytes)
U_KERNEL = "_lora_u_kernel"
FWD_KERNEL = "_nf4_lora_fwd_kernel"
SMALL_M_KERNEL = "_nf4_lora_fwd_small_m_kernel"
DU_DB_KERNEL = "_lora_bwd_du_db_kernel"
DA_KERNEL = "_lora_bwd_da_kernel"
DX_KERNEL = "_nf4_lora_bwd_dx_kernel"
DEQUANT_KERNEL = "_dequant_4bit_kernel"
DORA_NORM_KERNEL = "_dora_norm_kernel"
DORA_SCALES_KERNEL = "_dora_scales_kernel"
DORA_COMBINE_KERNEL = "_dora_combine_kernel"
COL_DOT_KERNEL = "_col_dot_kernel"
GEMV_KERNEL = "_nf4_lora_gemv_kernel"
# the model's names of the CUDA-core M <= 2 kernel by the rows it serves: each row of x costs
# it one more FMA a value, so its compiled ceiling is read per BLOCK_M (model_kernel)
GEMV_M1_KERNEL, GEMV_M2_KERNEL = f"{GEMV_KERNEL}[m=1]", f"{GEMV_KERNEL}[m=2]"
KERNEL_BOUND = {FWD_KERNEL: "mma", DX_KERNEL: "mma", U_KERNEL: "hbm", SMALL_M_KERNEL: "hbm",
                GEMV_M1_KERNEL: "hbm", GEMV_M2_KERNEL: "hbm", DU_DB_KERNEL: "hbm",
                DA_KERNEL: "hbm", DEQUANT_KERNEL: "hbm"}
# the DoRA layer's own kernels (csrc_triton/dora.py), modelled by `dora_steps` only
DORA_KERNEL_BOUND = {DORA_NORM_KERNEL: "hbm", DORA_SCALES_KERNEL: "hbm", DORA_COMBINE_KERNEL: "hbm",
                     COL_DOT_KERNEL: "hbm"}
# the one-pass forward (csrc_triton/forward.py _nf4_lora_fwd_one_pass_kernel, issue 30 part 4):
# its ceiling falls with the rank (U's product and accumulator grow), so the model reads it per
# padded rank, as compiled (model_kernel)
ONE_PASS_KERNEL = "_nf4_lora_fwd_one_pass_kernel"
ONE_PASS_RANKS = (16, 32, 64)
ONE_PASS_KERNEL_BOUND = {f"{ONE_PASS_KERNEL}[r={r}]": "mma" for r in ONE_PASS_RANKS}
SMALL_M_MAX = 16  # fastlora/launch/forward.py: M <= 16 takes the split-K small-M kernel
GEMV_MAX_M = 2  # fastlora/launch/forward.py: M <= 2 (no dropout) U and y in one launch

# the arch whose compiled code models each GPU of the table (fastlora/gpus.py); only
# fastlora.compilecheck.ARCHS have compiled ceilings, the others' kernels run unmodelled
GPU_ARCHS = {gpu.name: gpu.arch for gpu in gpus.GPUS}


@dataclass(frozen=True)
class Dims:
    m: int
    n: int
    k: int
    r: int
    e: int = 2               # bytes per activation element
    bias: bool = False
    blocksize: int = 64
    double_quant: bool = True


@dataclass(frozen=True)
class Step:
    """One kernel launch: its FLOPs and minimum bytes; `kernel` names the fastlora kernel it
    runs (csrc_triton), None for a peer's (library) kernel."""
    name: str
    flops: int
    bytes: int
    kernel: Optional[str] = None


def weight_bytes(d: Dims) -> int:
    """Packed 4-bit weight + its absmax (uint8 per block and fp32 per 256 blocks when
    double-quantised, fp32 per block otherwise)."""
    blocks = math.ceil(d.n * d.k / d.blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) if d.double_quant else 4 * blocks
    return math.ceil(d.n * d.k / 2) + scales


def _sizes(d: Dims) -> dict:
    e = d.e
    return dict(x=d.m * d.k * e, y=d.m * d.n * e, u=d.m * d.r * e, a=d.r * d.k * e,
                b=d.n * d.r * e, w4=weight_bytes(d), w16=d.n * d.k * e,
                bias=d.n * e if d.bias else 0)


def _mm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def layer_flops(mode: str, d: Dims) -> int:
    """The layer's matmul FLOPs (what every provider must compute):
    forward  x W^T, x A^T, U B^T               = 2MNK + 2MKr + 2MNr
    backward dy W, dy B, dy^T U, dU^T x, dU A  = 2MNK + 4MNr + 4MKr"""
    fwd = _mm(d.m, d.n, d.k) + _mm(d.m, d.r, d.k) + _mm(d.m, d.n, d.r)
    bwd = _mm(d.m, d.k, d.n) + 2 * _mm(d.m, d.r, d.n) + 2 * _mm(d.m, d.r, d.k)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def layer_bytes(mode: str, d: Dims) -> int:
    """The layer's compulsory traffic, each input and output once:
    forward  read W, x, A, B, bias; write y
    backward read dy, x, W, A, B; write dx, dA, dB"""
    s = _sizes(d)
    fwd = s["w4"] + s["x"] + s["a"] + s["b"] + s["bias"] + s["y"]
    bwd = s["y"] + s["x"] + s["w4"] + s["a"] + s["b"] + s["x"] + s["a"] + s["b"]
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _u_step(d: Dims, s: dict) -> Step:
    return Step("U = x A^T", _mm(d.m, d.r, d.k), s["x"] + s["a"] + s["u"], U_KERNEL)


def _fastlora(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    """fastlora's fused path, launch by launch (dropout 0)."""
    m, n, k, r = d.m, d.n, d.k, d.r
    # fastlora/launch/forward.py: U first (_lora_u_kernel), then the fused pass: the tiled
    # GEMM, or for M <= 16 the split-K small-M kernel, whose programs write fp32 partials of
    # x deq(W)^T and whose last program per N tile reads them back and adds s U B^T + bias;
    # for M <= 2 (no dropout) both in one launch on the CUDA cores (csrc_triton/gemv.py),
    # whose programs also write fp32 partials of U (one slice: the floor)
    fwd = [_u_step(d, s)]
    if m <= GEMV_MAX_M:
        part = 4 * m * (n + r)
        fwd = [Step("U, y = x deq(W)^T + s (x A^T) B^T + bias (CUDA cores, one launch)",
                    _mm(m, n, k) + _mm(m, r, k) + _mm(m, n, r),
                    s["x"] + s["w4"] + s["a"] + 2 * part + s["b"] + s["bias"] + s["y"]
                    + s["u"], GEMV_M1_KERNEL if m == 1 else GEMV_M2_KERNEL)]
    elif m <= SMALL_M_MAX:
        part = 4 * m * n  # one fp32 [M, N] partial (the floor: one slice), written and read
        fwd.append(Step("y = x deq(W)^T + s U B^T + bias (small-M, split-K, summed in-kernel)",
                        _mm(m, n, k) + _mm(m, n, r),
                        s["x"] + s["w4"] + 2 * part + s["u"] + s["b"] + s["bias"] + s["y"],
                        SMALL_M_KERNEL))
    else:
        fwd.append(Step("y = x deq(W)^T + s U B^T + bias (fused)", _mm(m, n, k) + _mm(m, n, r),
                        s["x"] + s["w4"] + s["u"] + s["b"] + s["bias"] + s["y"], FWD_KERNEL))
    # fastlora/launch/backward.py, in order: du_db, da, dx. du_db and da write fp32 partials
    # of dU, dB and dA (one part each: the floor) that each tile's last program reads back
    # and sums into the gradient (e bytes), in the same launch.
    bwd = [Step("dU = s dy B, dB = s dy^T U", 2 * _mm(m, r, n),
                s["y"] + s["b"] + s["u"] + s["u"] + s["b"] + 8 * (m + n) * r, DU_DB_KERNEL)]
    if k % d.blocksize == 0 and d.e < 4:  # no dropout: the dx GEMM makes dx's LoRA term
        bwd += [_da_step(d, s, write_dx=False),
                Step("dx = dU A + dy deq(W)", _mm(m, k, r) + _mm(m, k, n),
                     s["u"] + s["a"] + s["y"] + s["w4"] + s["x"], DX_KERNEL)]
    else:
        bwd += [_da_step(d, s, write_dx=True),
                Step("dx += dy deq(W)", _mm(m, k, n), s["y"] + s["w4"] + 2 * s["x"], DX_KERNEL)]
    return fwd, bwd


def one_pass_kernel(r: int) -> str:
    """The model's name of the one-pass forward at rank r (its padded rank's compiled rows)."""
    pad = next((p for p in ONE_PASS_RANKS if r <= p), None)
    if pad is None:
        raise ValueError(f"the one-pass forward serves ranks up to {ONE_PASS_RANKS[-1]}, got {r}")
    return f"{ONE_PASS_KERNEL}[r={pad}]"


def one_pass_steps(d: Dims) -> list[Step]:
    """fastlora's one-pass forward at M > 16 (fastlora/launch/forward.py, path 'one_pass'): U and
    y in one launch, x read once. FLOPs counted as the tiled GEMM's (the base product and
    U @ B^T): U's own product is priced in the kernel's ceiling, which is the base product's
    share of tensor-core peak once U's product has taken its cut (csrc_triton/forward.py
    _one_pass_spec)."""
    s = _sizes(d)
    return [Step("U = x A^T and y = x deq(W)^T + s U B^T + bias (one pass over x)",
                 _mm(d.m, d.n, d.k) + _mm(d.m, d.n, d.r),
                 s["x"] + s["w4"] + s["a"] + s["u"] + s["b"] + s["bias"] + s["y"],
                 one_pass_kernel(d.r))]


def one_pass_pays(d: Dims, peak: Peak, ceilings: Mapping[str, float]) -> bool:
    """Whether the one-pass forward (`one_pass_steps`) is modelled faster than the two-launch
    tiled path (U kernel, then the tiled GEMM) at M > 16: the second read of x in its loop
    against the U kernel's pass over x, whose share of the layer goes as 1 / N. `ceilings`
    must hold the tiled GEMM's, the U kernel's and the one-pass kernel's at d's rank
    (one_pass_ceilings): a missing one would be modelled at 1.0 and decide nothing honestly."""
    if d.m <= SMALL_M_MAX:
        raise ValueError(f"the one-pass forward serves M > {SMALL_M_MAX}, got {d.m}")
    one_pass = one_pass_steps(d)
    two_launch = _fastlora(d, _sizes(d))[0]
    missing = [st.kernel for st in one_pass + two_launch if st.kernel not in ceilings]
    if missing:
        raise ValueError(f"no ceiling for {missing}: the comparison needs both paths' kernels")
    return modelled_seconds(one_pass, peak, ceilings) < modelled_seconds(two_launch, peak,
                                                                         ceilings)


def _da_step(d: Dims, s: dict, write_dx: bool) -> Step:
    """The dA kernel: reads dU, x, A, writes dA (one fp32 part [r, K] written and read back);
    write_dx: also dx := dU A (the dequantize path's, or where the dx GEMM does not make it)."""
    m, k, r = d.m, d.k, d.r
    if write_dx:
        return Step("dA = dU^T x, dx = dU A", _mm(r, k, m) + _mm(m, k, r),
                    s["u"] + s["x"] + s["a"] + s["a"] + s["x"] + 8 * r * k, DA_KERNEL)
    return Step("dA = dU^T x", _mm(r, k, m), s["u"] + s["x"] + s["a"] + s["a"] + 8 * r * k,
                DA_KERNEL)


def group_forward_steps(ds: list) -> list[Step]:
    """fastlora's grouped forward (fastlora/launch/group.py) of members sharing x, at 3 <= M <=
    16: one U launch for all members (_lora_u_group_kernel) and one split-K GEMM launch for all
    (_nf4_lora_fwd_small_m_group_kernel), each reading x once; modelled at the single
    kernels' ceilings (U_KERNEL, SMALL_M_KERNEL: the group kernels run the same loops per
    member). At M <= 2 a group runs its members' own one-launch kernel (`steps`)."""
    m = ds[0].m
    if not GEMV_MAX_M < m <= SMALL_M_MAX or len({(d.m, d.k, d.e) for d in ds}) != 1:
        raise ValueError("group_forward_steps models members of one x at 3 <= M <= 16")
    sizes = [_sizes(d) for d in ds]
    x = sizes[0]["x"]
    u = Step("U_g = x A_g^T, every member (one launch)",
             sum(_mm(m, d.r, d.k) for d in ds), x + sum(s["a"] + s["u"] for s in sizes),
             U_KERNEL)
    gemm = Step("y_g = x deq(W_g)^T + s U_g B_g^T + bias_g (small-M, split-K, one launch)",
                sum(_mm(m, d.n, d.k) + _mm(m, d.n, d.r) for d in ds),
                x + sum(s["w4"] + 2 * 4 * m * d.n + s["u"] + s["b"] + s["bias"] + s["y"]
                        for d, s in zip(ds, sizes)), SMALL_M_KERNEL)
    return [u, gemm]


def _fastlora_dequant(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    """fastlora's dequantize + cuBLAS base path (fastlora/launch/dispatch.py): fastlora's U,
    du_db, da kernels at their ceilings, fastlora's dequantize kernel at its
    (HBM) ceiling writing W16 into the shared buffer, cuBLAS at the peer efficiency."""
    m, n, k, r = d.m, d.n, d.k, d.r
    du_db = _fastlora(d, s)[1][0]
    dequant = Step("dequantize W into the shared buffer", 0, s["w4"] + s["w16"],
                   DEQUANT_KERNEL)
    fwd = [_u_step(d, s), dequant,
           Step("y = x W^T + bias (cuBLAS addmm)", _mm(m, n, k),
                s["w16"] + s["x"] + s["bias"] + s["y"]),
           Step("y += s U B^T (cuBLAS addmm)", _mm(m, n, r), s["u"] + s["b"] + 2 * s["y"])]
    bwd = [du_db, _da_step(d, s, write_dx=True),
           dataclasses.replace(dequant, name="dequantize W into the shared buffer (again)"),
           Step("dx += dy W (cuBLAS addmm_)", _mm(m, k, n), s["y"] + s["w16"] + 2 * s["x"])]
    return fwd, bwd


def _peft_bnb(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    m, n, k, r = d.m, d.n, d.k, d.r
    fwd = [Step("bnb dequantize W", 0, s["w4"] + s["w16"]),
           Step("x W^T + bias", _mm(m, n, k), s["w16"] + s["x"] + s["bias"] + s["y"]),
           Step("PEFT clone of the result", 0, 2 * s["y"]),
           Step("lora_A(x)", _mm(m, r, k), s["x"] + s["a"] + s["u"]),
           Step("lora_B(U)", _mm(m, n, r), s["u"] + s["b"] + s["y"]),
           Step("* scaling", 0, 2 * s["y"]),
           Step("result + lora", 0, 3 * s["y"])]
    bwd = [Step("* scaling (grad)", 0, 2 * s["y"]),
           Step("dU = dt B", _mm(m, r, n), s["y"] + s["b"] + s["u"]),
           Step("dB = dt^T U", _mm(n, r, m), s["y"] + s["u"] + s["b"]),
           Step("dx_lora = dU A", _mm(m, k, r), s["u"] + s["a"] + s["x"]),
           Step("dA = dU^T x", _mm(r, k, m), s["u"] + s["x"] + s["a"]),
           Step("bnb dequantize W (again)", 0, s["w4"] + s["w16"]),
           Step("dx_base = dy W", _mm(m, k, n), s["y"] + s["w16"] + s["x"]),
           Step("dx = dx_base + dx_lora", 0, 3 * s["x"])]
    return fwd, bwd


def peft_bnb_inference(d: Dims) -> list[Step]:
    """PEFT's LoRA Linear4bit forward without autograd (generation): bitsandbytes 0.50 runs
    its fused 4-bit kernel on the packed weight there (bnb.matmul_4bit's no-grad branch,
    gemm_4bit: at M <= 16 on sm_80 / sm_90 for the large projections its dispatch mostly
    keeps the fused kernel; where it takes dequantize + F.linear instead, this is a lower
    bound of PEFT's time), then PEFT's LoRA ops as in training."""
    s = _sizes(d)
    m, n, k = d.m, d.n, d.k
    return [Step("bnb fused 4-bit product x deq(W)^T + bias", _mm(m, n, k),
                 s["w4"] + s["x"] + s["bias"] + s["y"])] + _peft_bnb(d, s)[0][2:]


def _dequant_mm(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    m, n, k, r = d.m, d.n, d.k, d.r
    fwd = [Step("dequantize W into the buffer", 0, s["w4"] + s["w16"]),
           Step("y = x W^T + bias", _mm(m, n, k), s["w16"] + s["x"] + s["bias"] + s["y"]),
           Step("U = x A^T", _mm(m, r, k), s["x"] + s["a"] + s["u"]),
           Step("y += s U B^T (addmm)", _mm(m, n, r), s["u"] + s["b"] + 2 * s["y"])]
    bwd = [Step("dU = s dy B", _mm(m, r, n), s["y"] + s["b"] + s["u"]),
           Step("dB = s dy^T U", _mm(n, r, m), s["y"] + s["u"] + s["b"]),
           Step("dA = dU^T x", _mm(r, k, m), s["u"] + s["x"] + s["a"]),
           Step("dequantize W into the buffer (again)", 0, s["w4"] + s["w16"]),
           Step("dx = dy W", _mm(m, k, n), s["y"] + s["w16"] + s["x"]),
           Step("dx += dU A (addmm)", _mm(m, k, r), s["u"] + s["a"] + 2 * s["x"])]
    return fwd, bwd


def _reference(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    m, n, k, r = d.m, d.n, d.k, d.r
    # the torch dequantize takes several elementwise passes; one read + one write is its floor
    fwd = [Step("torch dequantize W", 0, s["w4"] + s["w16"]),
           Step("U = x A^T", _mm(m, r, k), s["x"] + s["a"] + s["u"]),
           Step("x W^T", _mm(m, n, k), s["w16"] + s["x"] + s["y"]),
           Step("U B^T", _mm(m, n, r), s["u"] + s["b"] + s["y"]),
           Step("* scaling", 0, 2 * s["y"]),
           Step("sum", 0, 3 * s["y"])]
    if d.bias:
        fwd.append(Step("+ bias", 0, 2 * s["y"] + s["bias"]))
    bwd = [Step("dy B", _mm(m, r, n), s["y"] + s["b"] + s["u"]),
           Step("dU = * scaling", 0, 2 * s["u"]),
           Step("dy^T U", _mm(n, r, m), s["y"] + s["u"] + s["b"]),
           Step("dB = * scaling", 0, 2 * s["b"]),
           Step("dA = dU^T x", _mm(r, k, m), s["u"] + s["x"] + s["a"]),
           Step("torch dequantize W (again)", 0, s["w4"] + s["w16"]),
           Step("dy W", _mm(m, k, n), s["y"] + s["w16"] + s["x"]),
           Step("dU A", _mm(m, k, r), s["u"] + s["a"] + s["x"]),
           Step("dx = sum", 0, 3 * s["x"])]
    return fwd, bwd


# "fastlora" is modelled on its fused path; "fastlora_dequant" on its dequantize + cuBLAS path
# (the dispatcher picks per shape and role on a GPU: `expected_pick` says which the model
# expects to win)
PROVIDER_STEPS = {"fastlora": _fastlora, "fastlora_dequant": _fastlora_dequant,
                  "peft_bnb": _peft_bnb, "dequant_mm": _dequant_mm, "reference": _reference}


def steps(provider: str, mode: str, d: Dims) -> list[Step]:
    """The kernels `provider` launches for `mode` ('forward', 'backward' or 'full')."""
    if provider not in PROVIDER_STEPS:
        raise ValueError(f"no cost model for provider {provider!r}; modelled providers: "
                         f"{', '.join(PROVIDER_STEPS)}")
    fwd, bwd = PROVIDER_STEPS[provider](d, _sizes(d))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# ---------------------------------------------------------------------- DoRA (issue 12)
# Dropout 0 (what the benchmark times); magnitudes and norms are fp32 [N] vectors.

def _fastlora_dora(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    """fastlora/ops/dora.py at p = 0, launch by launch: the norm pass over the packed weight
    (fp32 partials), the scales kernel (norm, mns, the fp32 absmax of diag(mns) W, diag(mns) B);
    without bias the plain fused forward on them gives y, with a bias the plain forward writes
    z and an fp32 combine forms y. Backward: the magnitude's column dot, the scales kernel
    again (which also finishes dm), the plain backward on the scaled weight (fp32 absmax) and
    dB = diag(mns) dB' (one torch op)."""
    m, n, k, r = d.m, d.n, d.k, d.r
    plain_fwd, plain_bwd = _fastlora(dataclasses.replace(d, bias=False), {**s, "bias": 0})
    blocks = math.ceil(n * k / d.blocksize)
    absmax_in = weight_bytes(d) - math.ceil(n * k / 2)
    w_scaled = weight_bytes(dataclasses.replace(d, double_quant=False))
    vec = 4 * n  # one fp32 [N] vector

    def on_scaled(st):
        if "deq(W)" not in st.name:
            return st
        return dataclasses.replace(st, bytes=st.bytes - s["w4"] + w_scaled)
    norm = Step("norm^2 parts = sum (W + s B A)^2 (one pass over the packed W)", _mm(n, k, r),
                s["w4"] + s["a"] + s["b"] + vec, DORA_NORM_KERNEL)
    scales = Step("norm, mns, absmax of diag(mns) W, diag(mns) B (scales)", 0,
                  3 * vec + absmax_in + 4 * blocks + 2 * s["b"], DORA_SCALES_KERNEL)
    if d.bias:
        fwd = [norm, dataclasses.replace(scales, name="norm, mns (scales)", bytes=4 * vec)]
        fwd += [dataclasses.replace(st, name=st.name.replace("+ bias", "(z, no bias)"))
                for st in plain_fwd]
        fwd.append(Step("y = mns * z + bias (fp32 combine)", 0, 2 * s["y"] + s["bias"] + vec,
                        DORA_COMBINE_KERNEL))
    else:
        fwd = [norm, scales] + [on_scaled(st) for st in plain_fwd]
    bwd = [Step("dm parts = sum_m dy * z", 0, 2 * s["y"] + vec, COL_DOT_KERNEL),
           dataclasses.replace(scales, name="dm, absmax of diag(mns) W, diag(mns) B (scales)",
                               bytes=4 * vec + absmax_in + 4 * blocks + 2 * s["b"])]
    bwd += [on_scaled(st) for st in plain_bwd]
    bwd.append(Step("dB = diag(mns) dB' (torch, in place)", 0, 2 * s["b"] + vec))
    return fwd, bwd


def _peft_dora_bnb(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    """PEFT's DoRA Linear4bit over bitsandbytes at p = 0 (peft/tuners/lora/bnb.py and
    dora.py: DoraLinearLayer.forward), the adapters in the activation dtype: the base layer,
    then B A built through an identity matrix, W dequantised again, the norm of W + s B A over
    [N, K] tensors, the LoRA GEMMs and the elementwise DoRA combination; autograd's backward
    of all of it (the norm is detached: nothing flows through the [N, K] path)."""
    m, n, k, r = d.m, d.n, d.k, d.r
    nk = n * k * d.e
    fwd = [Step("bnb dequantize W", 0, s["w4"] + s["w16"]),
           Step("x W^T + bias", _mm(m, n, k), s["w16"] + s["x"] + s["bias"] + s["y"]),
           Step("PEFT clone of the result", 0, 2 * s["y"]),
           Step("eye(K)", 0, k * k * d.e),
           Step("lora_A(eye)", _mm(k, r, k), k * k * d.e + s["a"] + k * r * d.e),
           Step("lora_B(.) -> B A [K, N]", _mm(k, n, r), k * r * d.e + s["b"] + nk),
           Step("bnb dequantize W (DoRA)", 0, s["w4"] + s["w16"]),
           Step("s * B A", 0, 2 * nk),
           Step("W + s B A", 0, 3 * nk),
           Step("row norm", 0, nk + 4 * n),
           Step("mns = m / norm", 0, 12 * n),
           Step("lora_A(x)", _mm(m, r, k), s["x"] + s["a"] + s["u"]),
           Step("lora_B(U)", _mm(m, n, r), s["u"] + s["b"] + s["y"])]
    if d.bias:
        fwd.append(Step("base_result - bias", 0, 2 * s["y"] + s["bias"]))
    fwd += [Step("mns - 1", 0, 8 * n), Step("(mns - 1) * base", 0, 2 * s["y"]),
            Step("mns * lora", 0, 2 * s["y"]), Step("* scaling", 0, 2 * s["y"]),
            Step("sum of the two", 0, 3 * s["y"]), Step("result + DoRA term", 0, 3 * s["y"])]
    bwd = [Step("grads of the sums and scalings", 0, 6 * s["y"]),
           Step("d(mns - 1), d mns: dy * base, dy * lora, summed over M", 0, 6 * s["y"]),
           Step("d lora = dy * mns * s", 0, 4 * s["y"]),
           Step("d base = dy * (mns - 1) + dy", 0, 5 * s["y"]),
           Step("dU = dt B", _mm(m, r, n), s["y"] + s["b"] + s["u"]),
           Step("dB = dt^T U", _mm(n, r, m), s["y"] + s["u"] + s["b"]),
           Step("dx_lora = dU A", _mm(m, k, r), s["u"] + s["a"] + s["x"]),
           Step("dA = dU^T x", _mm(r, k, m), s["u"] + s["x"] + s["a"]),
           Step("bnb dequantize W (again)", 0, s["w4"] + s["w16"]),
           Step("dx_base = d base W", _mm(m, k, n), s["y"] + s["w16"] + s["x"]),
           Step("dx = dx_base + dx_lora", 0, 3 * s["x"])]
    return fwd, bwd


DORA_PROVIDER_STEPS = {"fastlora": _fastlora, "fastlora_dora": _fastlora_dora,
                       "peft_dora_bnb": _peft_dora_bnb}


def dora_steps(provider: str, mode: str, d: Dims) -> list[Step]:
    """`steps` for the DoRA benchmark's providers (fastlora: the plain LoRA layer it is
    measured against)."""
    if provider not in DORA_PROVIDER_STEPS:
        raise ValueError(f"no DoRA cost model for provider {provider!r}; modelled: "
                         f"{', '.join(DORA_PROVIDER_STEPS)}")
    fwd, bwd = DORA_PROVIDER_STEPS[provider](d, _sizes(d))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def roofline_seconds(step_list: list[Step], peak: Peak) -> float:
    """The ideal roofline: sum of max(compute time, memory time) over the kernels, at 100% of
    the datasheet peaks and no launch cost (what no code reaches; `modelled_seconds` is the
    suite's model)."""
    return sum(max(s.flops / (peak.tflops * 1e12), s.bytes / (peak.gbs * 1e9))
               for s in step_list)


# ---------------------------------------------------------------------- modelled time

def step_seconds(step: Step, peak: Peak, ceilings: Mapping[str, float]) -> float:
    """Modelled time of one launch (module docstring): a fastlora kernel at its hot-loop
    ceiling from `ceilings` (kernel -> share; 1.0 when absent: unmodelled), a peer kernel at
    the assumed library efficiencies; plus LAUNCH_OVERHEAD_S either way."""
    flops_per_s, bytes_per_s = peak.tflops * 1e12, peak.gbs * 1e9
    if step.kernel is None:
        flops_per_s *= PEER_GEMM_EFFICIENCY
        bytes_per_s *= PEER_BANDWIDTH_EFFICIENCY
    else:
        ceiling = ceilings.get(step.kernel, 1.0)
        if not ceiling or ceiling <= 0:
            raise ValueError(f"ceiling of {step.kernel} must be > 0, got {ceiling!r}")
        if {**KERNEL_BOUND, **DORA_KERNEL_BOUND, **ONE_PASS_KERNEL_BOUND}[step.kernel] == "mma":
            flops_per_s *= ceiling
        else:
            bytes_per_s *= ceiling
    return max(step.flops / flops_per_s, step.bytes / bytes_per_s) + LAUNCH_OVERHEAD_S


def modelled_seconds(step_list: list[Step], peak: Peak,
                     ceilings: Optional[Mapping[str, float]] = None) -> float:
    """The suite's modelled time of a provider: the sum of step_seconds over its launches.
    `ceilings` (kernel -> hot-loop ceiling, e.g. kernel_ceilings(arch)) only affects
    fastlora's kernels; None or a missing kernel: 1.0 (unmodelled)."""
    return sum(step_seconds(s, peak, ceilings or {}) for s in step_list)


def expected_pick(mode: str, d: Dims, peak: Optional[Peak] = None,
                  ceilings: Optional[Mapping[str, float]] = None, arch: str = "sm_90") -> dict:
    """{role: 'fused' | 'dequant'} the model expects fastlora's dispatcher to pick for the
    roles `mode` runs ('forward' and/or 'dx'): the path whose base-product steps (the ones
    that differ; the LoRA-side kernels are shared) have the shorter modelled time.
    peak None: the GPU table's row of this machine's GPU, else of `arch`'s reference GPU
    (fastlora.gpus.current)."""
    ceilings = ceilings or {}
    if peak is None:
        peak = peak_of(gpus.current(arch))
    fused_fwd, fused_bwd = _fastlora(d, _sizes(d))
    deq_fwd, deq_bwd = _fastlora_dequant(d, _sizes(d))
    shared_u = 0 if d.m <= GEMV_MAX_M else 1  # the one-launch kernel computes U itself
    # dx: from the dA pass on (it writes dx's LoRA term on the dequantize path, and on the
    # fused one where the dx GEMM does not make it)
    roles = {"forward": (fused_fwd[shared_u:], deq_fwd[shared_u:]),
             "dx": (fused_bwd[1:], deq_bwd[1:])}
    wanted = {"forward": ("forward",), "backward": ("dx",), "full": ("forward", "dx")}[mode]
    picks = {}
    for role in wanted:
        fused, dequant = roles[role]
        picks[role] = "fused" if modelled_seconds(fused, peak, ceilings) <= \
            modelled_seconds(dequant, peak, ceilings) else "dequant"
    return picks


def fastlora_kernels() -> tuple:
    """Every kernel fastlora's steps can launch (both forward paths, and the dequantize
    kernel of the dequantize + cuBLAS base path), in KERNEL_BOUND order."""
    return tuple(KERNEL_BOUND)


# ---------------------------------------------------------------------- hot-loop ceilings

def dtype_class(e: int) -> str:
    """'16bit' (bf16/fp16 activations, e = 2) or 'fp32' (e = 4: the tf32 configs)."""
    return "16bit" if e == 2 else "fp32"


def spec_dtype_class(spec) -> str:
    """A CompileSpec's dtype class, from its pointer types: '16bit' when any is bf16 / fp16."""
    types = set(spec.signature.values())
    return "16bit" if types & {"*bf16", "*fp16"} else "fp32"


def _config_dtype_class(config: str) -> str:
    words = config.replace("=", " ").split()
    return "16bit" if {"bf16", "fp16"} & set(words) else "fp32"


def model_kernel(kernel: str, config: str) -> str:
    """The model's name of a compiled config's kernel: the kernel's own, or for the CUDA-core
    M <= 2 kernel its name with the rows the config serves (GEMV_M1_KERNEL, GEMV_M2_KERNEL), for
    the one-pass forward its name with the padded rank (one_pass_kernel)."""
    if kernel == GEMV_KERNEL:
        rows = re.search(r"BLOCK_M=(\d+)", config).group(1)
        return f"{kernel}[m={rows}]"
    if kernel == ONE_PASS_KERNEL:
        return one_pass_kernel(int(re.search(r"BLOCK_R=(\d+)", config).group(1)))
    return kernel


def needed_specs(arch: str, klass: str = "16bit", specs=None, kernels=None) -> list:
    """The CompileSpecs whose compiled ceilings `kernel_ceilings` reads for `arch` and dtype
    class: per kernel, its headline specs (ceiling_target > 0) when it has any, else all of
    its specs; full-precision fp32 ('ieee', fma_dot) specs never (they have no ceiling)."""
    if specs is None:
        from csrc_triton import all_compile_specs

        specs = all_compile_specs()
    from ..compilecheck import compiles_for

    kernels = set(kernels if kernels is not None else fastlora_kernels())
    chosen = []
    for kernel in sorted(kernels):
        mine = [s for s in specs if model_kernel(s.kernel, s.config) == kernel
                and compiles_for(s, arch)
                and not getattr(s, "fma_dot", False) and spec_dtype_class(s) == klass]
        headline = [s for s in mine if getattr(s, "ceiling_target", 0) > 0]
        chosen += headline or mine
    return chosen


def ceilings_from_rows(rows, arch: str, klass: str = "16bit", specs=None) -> dict:
    """{kernel: best ceiling} over compile-report rows of `arch` and dtype class (no compiling):
    per kernel the headline specs' rows when the report has any, else all its rows; rows with
    ceiling None (fp32 'ieee') are skipped. A kernel without a row is absent (unmodelled).
    `specs` (default: csrc_triton.all_compile_specs()) tells which rows are headline and each
    row's dtype; a row matching no spec gets its dtype from its config text."""
    if specs is None:
        from csrc_triton import all_compile_specs

        specs = all_compile_specs()
    by_key = {(s.kernel, s.config): s for s in specs}
    found: dict = {}
    for row in rows:
        if row.get("arch") != arch or row.get("ceiling") is None:
            continue
        spec = by_key.get((row["kernel"], row["config"]))
        row_class = spec_dtype_class(spec) if spec is not None \
            else _config_dtype_class(row["config"])
        if row_class != klass:
            continue
        headline = spec is not None and getattr(spec, "ceiling_target", 0) > 0
        found.setdefault(model_kernel(row["kernel"], row["config"]),
                         {True: [], False: []})[headline].append(float(row["ceiling"]))
    return {kernel: max(parts[True] or parts[False]) for kernel, parts in found.items()}


@functools.lru_cache(maxsize=None)
def _compiled_ceilings(arch: str, klass: str, kernels: Optional[tuple] = None) -> tuple:
    from ..compilerecord import recorded_report

    specs = needed_specs(arch, klass, kernels=kernels)
    rows = recorded_report((arch,), configs=[(s.kernel, s.config) for s in specs])
    return tuple(sorted(ceilings_from_rows(rows, arch, klass, specs).items()))


def dora_kernel_ceilings(arch: str, klass: str = "16bit", rows=None) -> dict:
    """kernel_ceilings for the plain layer's kernels and the DoRA kernels (csrc_triton/dora.py)
    together: what `dora_steps` reads."""
    if rows is not None:
        return ceilings_from_rows(rows, arch, klass)
    return dict(_compiled_ceilings(arch, klass, fastlora_kernels() + tuple(DORA_KERNEL_BOUND)))


def one_pass_ceilings(arch: str, rows=None) -> dict:
    """kernel_ceilings (16-bit) for the plain layer's kernels and the one-pass forward at each
    padded rank together: what `one_pass_pays` reads."""
    if rows is not None:
        return ceilings_from_rows(rows, arch, "16bit")
    return dict(_compiled_ceilings(arch, "16bit",
                                   fastlora_kernels() + tuple(ONE_PASS_KERNEL_BOUND)))


def kernel_ceilings(arch: str, klass: str = "16bit", rows=None) -> dict:
    """{fastlora kernel: hot-loop ceiling} for compile target `arch` and dtype class:
    the best ceiling among the kernel's compiled specs, headline specs (ceiling_target > 0)
    preferred; kernels without a compiled row are absent (the model runs them at 1.0 and
    says "unmodelled"), every kernel for an arch the compile check does not cover.

    rows: compile-report rows already at hand (fastlora.compile_report(...) output): read
    them, compile nothing. Otherwise compiles only `needed_specs(arch, klass)`, once per
    process (cached)."""
    if rows is not None:
        return ceilings_from_rows(rows, arch, klass)
    return dict(_compiled_ceilings(arch, klass))


def describe_ceilings(ceilings: Mapping[str, float], kernels=None) -> str:
    """'_lora_u_kernel 0.41 of HBM, _nf4_lora_fwd_kernel 0.57 of tensor peak, ...; unmodelled
    (ideal roofline, 1.0): ...' for the table notes."""
    kernels = kernels if kernels is not None else fastlora_kernels()
    have = [f"{k} {ceilings[k]:.2f} of {'tensor peak' if KERNEL_BOUND[k] == 'mma' else 'HBM'}"
            for k in kernels if k in ceilings]
    missing = [k for k in kernels if k not in ceilings]
    text = ", ".join(have) if have else "none compiled"
    if missing:
        text += "; unmodelled (no compiled row: run at 1.0, the ideal roofline): " \
            + ", ".join(missing)
    return text


# ---------------------------------------------------------------------- mixed batches
# G adapters of rank r, tokens spread evenly (M / G rows each); dropout 0.

def _mixed_fastlora(d: Dims, count: int) -> tuple[list[Step], list[Step]]:
    """fastlora/launch/mixed.py: the plain layer's launches at the summed rank G * r (U and
    dU masked per row inside the kernels; no gather, no scatter); past WIDE_RANK the LoRA-side
    products are matmuls (cuBLAS, at the peer efficiency) with one mask pass each for U and
    dU, the base products fused."""
    from csrc_triton.forward import rank_block
    from ..launch.mixed import WIDE_RANK

    wide = dataclasses.replace(d, r=d.r * count)
    s = _sizes(wide)
    fwd, bwd = _fastlora(wide, s)
    if rank_block(wide.r) <= WIDE_RANK:
        return fwd, bwd
    m, n, k, r = wide.m, wide.n, wide.k, wide.r
    mask = Step("U' = U * factor (mask, scalings)", 0, 2 * s["u"] + 4 * r)
    fwd = [Step("U = x A_cat^T (matmul)", _mm(m, r, k), s["x"] + s["a"] + s["u"]), mask] \
        + [st for st in fwd if st.kernel != U_KERNEL]
    bwd = [Step("dB = dy^T U' (matmul)", _mm(n, r, m), s["y"] + s["u"] + s["b"]),
           Step("dU' = dy B_cat (matmul)", _mm(m, r, n), s["y"] + s["b"] + s["u"]),
           dataclasses.replace(mask, name="dU = dU' * factor (mask, scalings)"),
           Step("dx = dU A_cat (matmul)", _mm(m, k, r), s["u"] + s["a"] + s["x"]),
           Step("dA = dU^T x (matmul)", _mm(r, k, m), s["u"] + s["x"] + s["a"]),
           bwd[-1]]
    return fwd, bwd


def _peft_mixed(d: Dims, count: int) -> tuple[list[Step], list[Step]]:
    """PEFT's _mixed_batch_forward over bitsandbytes: the base once (dequantize + matmul), then
    per adapter a gather of its rows, lora_A, lora_B, * scaling and an in-place scatter-add;
    autograd mirrors it (the gathers' backward is a scatter of dx rows)."""
    m, n, k, r = d.m, d.n, d.k, d.r
    s = _sizes(d)
    rows = math.ceil(m / count)
    e = d.e
    xs, ys, us = rows * k * e, rows * n * e, rows * r * e
    fwd = [Step("bnb dequantize W", 0, s["w4"] + s["w16"]),
           Step("x W^T + bias", _mm(m, n, k), s["w16"] + s["x"] + s["bias"] + s["y"])]
    bwd = [Step("bnb dequantize W (again)", 0, s["w4"] + s["w16"]),
           Step("dx_base = dy W", _mm(m, k, n), s["y"] + s["w16"] + s["x"])]
    for g in range(count):
        fwd += [Step(f"x[rows of {g}] (gather)", 0, 2 * xs),
                Step("lora_A(x_g)", _mm(rows, r, k), xs + s["a"] + us),
                Step("lora_B(U_g)", _mm(rows, n, r), us + s["b"] + ys),
                Step("* scaling", 0, 2 * ys),
                Step("result[rows] += (index_put)", 0, 3 * ys)]
        bwd += [Step("dy[rows] (gather)", 0, 2 * ys),
                Step("* scaling (grad)", 0, 2 * ys),
                Step("dU_g = dt B_g", _mm(rows, r, n), ys + s["b"] + us),
                Step("dB_g = dt^T U_g", _mm(n, r, rows), ys + us + s["b"]),
                Step("dx_g = dU_g A_g", _mm(rows, k, r), us + s["a"] + xs),
                Step("dA_g = dU_g^T x_g", _mm(r, k, rows), us + xs + s["a"]),
                Step("dx[rows] += dx_g (scatter)", 0, 3 * xs)]
    return fwd, bwd


def _one_at_a_time(d: Dims, count: int) -> tuple[list[Step], list[Step]]:
    """Each adapter's rows through their own fused layer: a gather of x's rows, the plain
    layer at M / G rows (the 4-bit weight read G times), a scatter of y's rows; backward the
    plain layer's per adapter and a scatter of dx's rows."""
    part = dataclasses.replace(d, m=math.ceil(d.m / count))
    s = _sizes(part)
    one_fwd, one_bwd = _fastlora(part, s)
    fwd = [Step("x[rows] (gather)", 0, 2 * s["x"])] + one_fwd \
        + [Step("y[rows] = (index_copy)", 0, 2 * s["y"])]
    bwd = [Step("dy[rows] (gather)", 0, 2 * s["y"])] + one_bwd \
        + [Step("dx[rows] = (scatter)", 0, 2 * s["x"])]
    return fwd * count, bwd * count


def mixed_steps(provider: str, mode: str, d: Dims, count: int) -> list[Step]:
    """`steps` for the mixed-batch benchmark's providers (fastlora/bench/mixed.py): `count`
    adapters of rank d.r over d.m tokens spread evenly; "fastlora" is one adapter over the
    whole batch (what the mixed batch is measured against)."""
    builders = {"fastlora": lambda: _fastlora(d, _sizes(d)),
                "fastlora_mixed": lambda: _mixed_fastlora(d, count),
                "peft_mixed_bnb": lambda: _peft_mixed(d, count),
                "one_at_a_time": lambda: _one_at_a_time(d, count)}
    if provider not in builders:
        raise ValueError(f"no mixed-batch cost model for provider {provider!r}; modelled: "
                         f"{', '.join(builders)}")
    fwd, bwd = builders[provider]()
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _rank_rows(rows, kernel: str, total_rank: int) -> list:
    """The compile-report rows of `kernel` compiled for the padded rank of total_rank (U:
    BLOCK_R, dU/dB and dA: R_PAD), its mixed-batch (SEGMENTED) rows preferred."""
    from csrc_triton.forward import rank_block

    width = rank_block(total_rank)
    tag = f"BLOCK_R={width}," if kernel == U_KERNEL else f"R_PAD={width}"
    mine = [r for r in rows if r["kernel"] == kernel and tag in r["config"]
            and r.get("ceiling") is not None]
    return [r for r in mine if " mixed" in r["config"]] or mine


def mixed_kernel_ceilings(arch: str, total_rank: int, klass: str = "16bit", rows=None) -> dict:
    """kernel_ceilings for a mixed batch whose adapters' ranks sum to total_rank: the U,
    dU/dB and dA kernels at the best ceiling compiled for that padded rank (mixed-batch rows
    preferred), every other kernel as kernel_ceilings says. rows: compile-report rows at hand
    (else the needed specs are compiled, cached per process)."""
    out = kernel_ceilings(arch, klass, rows)
    if rows is None:
        rows = [dict(r) for r in _rank_ceiling_rows(arch, klass, total_rank)]
    for kernel in (U_KERNEL, DU_DB_KERNEL, DA_KERNEL):
        found = [r for r in _rank_rows(rows, kernel, total_rank) if r["arch"] == arch
                 and _config_dtype_class(r["config"]) == klass]
        if found:
            out[kernel] = max(float(r["ceiling"]) for r in found)
    return out


@functools.lru_cache(maxsize=None)
def _rank_ceiling_rows(arch: str, klass: str, total_rank: int) -> tuple:
    from csrc_triton import all_compile_specs
    from ..compilerecord import recorded_report

    specs = [s for s in all_compile_specs() if arch in s.archs and spec_dtype_class(s) == klass
             and s.kernel in (U_KERNEL, DU_DB_KERNEL, DA_KERNEL)
             and not getattr(s, "fma_dot", False)]
    fake = [{"kernel": s.kernel, "config": s.config, "ceiling": 1.0} for s in specs]
    wanted = {(r["kernel"], r["config"]) for k in (U_KERNEL, DU_DB_KERNEL, DA_KERNEL)
              for r in _rank_rows(fake, k, total_rank)}
    rows = recorded_report((arch,), configs=sorted(wanted)) if wanted else []
    return tuple(tuple(sorted(r.items())) for r in rows)
