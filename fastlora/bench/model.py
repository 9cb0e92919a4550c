"""Modelled cost of one QLoRA linear layer per provider: counted FLOPs and minimum DRAM bytes
of each kernel the provider launches, and a roofline time over a GPU's datasheet peaks.

Notation: x [M, K], W [N, K] in 4 bits, A [r, K], B [N, r], activations of e bytes (2 for
bf16/fp16). Every matmul of [a, b] @ [b, c] counts 2abc FLOPs; elementwise work counts bytes
only. A kernel's minimum bytes = each tensor it reads or writes, moved once. The 4-bit weight
moves as N*K/2 packed bytes plus its absmax: one uint8 per block and one fp32 per 256 blocks
with double quantisation (N*K/blocksize * 4 bytes without); the 16- and 256-entry code tables
(~1 KB, cache-resident) are left out. The bias is frozen (QLoRA), so it is read, never written.

Modelled time = sum over a provider's kernels of max(FLOPs / peak FLOP/s, bytes / peak B/s):
a roofline per launch, with no launch latency, no wave quantisation and perfect caching inside
a kernel. It is a model, not a measurement; every number derived here is labelled "modelled".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .peaks import Peak


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
    """One kernel launch: its FLOPs and minimum bytes."""
    name: str
    flops: int
    bytes: int


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


def _fastlora(d: Dims, s: dict) -> tuple[list[Step], list[Step]]:
    m, n, k, r = d.m, d.n, d.k, d.r
    # fastlora/launch/forward.py: U first (_lora_u_kernel), then the fused pass
    fwd = [Step("U = x A^T", _mm(m, r, k), s["x"] + s["a"] + s["u"]),
           Step("y = x deq(W)^T + s U B^T + bias (fused)", _mm(m, n, k) + _mm(m, n, r),
                s["x"] + s["w4"] + s["u"] + s["b"] + s["bias"] + s["y"])]
    # fastlora/launch/backward.py's three kernels, in order (their small fp32 split-reduction
    # partials for dU, dA, dB are left out: O((M + N + K) r) bytes)
    bwd = [Step("dU = s dy B, dB = s dy^T U", 2 * _mm(m, r, n),
                s["y"] + s["b"] + s["u"] + s["u"] + s["b"]),
           Step("dA = dU^T x, dx = dU A", _mm(r, k, m) + _mm(m, k, r),
                s["u"] + s["x"] + s["a"] + s["a"] + s["x"]),
           Step("dx += dy deq(W)", _mm(m, k, n), s["y"] + s["w4"] + 2 * s["x"])]
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


PROVIDER_STEPS = {"fastlora": _fastlora, "peft_bnb": _peft_bnb, "dequant_mm": _dequant_mm,
                  "reference": _reference}


def steps(provider: str, mode: str, d: Dims) -> list[Step]:
    """The kernels `provider` launches for `mode` ('forward', 'backward' or 'full')."""
    if provider not in PROVIDER_STEPS:
        raise ValueError(f"no cost model for provider {provider!r}; modelled providers: "
                         f"{', '.join(PROVIDER_STEPS)}")
    fwd, bwd = PROVIDER_STEPS[provider](d, _sizes(d))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def roofline_seconds(step_list: list[Step], peak: Peak) -> float:
    """Modelled time: sum of max(compute time, memory time) over the kernels."""
    return sum(max(s.flops / (peak.tflops * 1e12), s.bytes / (peak.gbs * 1e9))
               for s in step_list)
