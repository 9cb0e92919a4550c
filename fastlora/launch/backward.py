"""Launcher of csrc_triton/backward.py: the gradients of the QLoRA layer.

    dU = s * dy @ B      dB = s * dy^T @ U      (one pass over dy, _lora_bwd_du_db_kernel)
    dA = dU^T @ dropout(x)                          (one pass over x, _lora_bwd_da_kernel)
    dx = dropout'(dU @ A) + dy @ deq(W)             (W read packed, _nf4_lora_bwd_dx_kernel)

in that order (each step needs the one before): three launches. dx's LoRA term is made in the
dx GEMM for 16-bit activations with K on the blocksize (dx written once), with dropout from the
dA kernel's mask bits where the GPU takes them (csrc_triton/backward.py DROPOUT_BITS_TARGETS);
else the dA kernel writes it and the dx GEMM, or dequantize + cuBLAS where the dispatcher gives
dx's base product to them, adds dy @ deq(W) to it (dx_and_da). Sums over M (dB, dA) and over
N (dU) are cut into a fixed number of parts whose fp32 partials are added in a fixed order by
the last program of each tile to finish, inside the same launch (csrc_triton/common.py
last_to_arrive, with counters from common.arrival_counters): same inputs, same config ->
bit-identical gradients. On a GPU the autotuner's pick is cached per process; pass `config=`
to pin it across processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton

from ..checks import ACTIVATION_DTYPES, check_fused_rank, check_inputs, check_seed_arg
from ..gpus import CONFIG_FAMILY
from ..quant import QuantState
from ..reference import dropout_threshold
from . import dispatch
from .common import (LAUNCH_OPTIONS, arrival_counters, cached_autotuner, compile_arch,
                     decode_flags, dot_precision, kernel_entry, num_sms, seed_args,
                     weight_args)

__all__ = ["lora_backward", "check_backward_args", "du_db", "da", "dx_and_da", "dx_gemm",
           "dx_path", "LoraTerm", "Configs", "KERNELS"]

KERNELS = ("du_db", "da", "dx")  # the keys of `config=`


def _parallelism(device: torch.device) -> int:
    """How many programs a split kernel should aim for: two waves on a GPU; in the
    interpreter a few, so that the tests exercise multi-part reductions."""
    return 2 * num_sms(device) if device.type == "cuda" else 4


def _parts(extent: int, unit: int, count: int) -> tuple[int, int]:
    """Cut `extent` into at most `count` parts of a multiple of `unit` (>= 1 part);
    returns (part size, number of parts)."""
    tiles = triton.cdiv(extent, unit)
    size = triton.cdiv(tiles, max(1, min(count, tiles))) * unit
    return size, triton.cdiv(extent, size)


class Configs:
    """Which config each kernel runs with: `config[kernel]` when given (a dict of its BLOCK_*
    constexprs plus num_warps / num_stages), else the fixed interpreter config, else the
    autotuner over the arch's list for the activation class and dot precision."""

    def __init__(self, x: torch.Tensor, config: Optional[dict]):
        from csrc_triton import backward as kernels

        self.kernels = kernels
        config = config or {}
        if not isinstance(config, dict) or set(config) - set(KERNELS):
            raise ValueError(f"config must be a dict with keys among {KERNELS}, each a dict of "
                             f"block sizes, num_warps and num_stages; got {config!r}")
        self.fixed = {}
        for name in KERNELS:
            if name in config:
                meta = dict(config[name])
                self.fixed[name] = triton.Config(
                    {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")},
                    num_warps=meta.get("num_warps", 4), num_stages=meta.get("num_stages", 2))
        if x.device.type != "cuda":  # every kernel's, the group's dx GEMM included
            for name, cfg in kernels.INTERPRETER_CONFIGS.items():
                self.fixed.setdefault(name, cfg)
        # (arch, fp32, dot precision, compile target): fp32 at precision "ieee" autotunes over
        # its own spill-free list (csrc_triton.backward.IEEE_CONFIGS), cached apart from
        # tf32's; sm_80's siblings (sm_86, sm_89, sm_100, sm_120) run its lists with their fixes
        target = compile_arch(x.device) if x.device.type == "cuda" else None
        self.tuned = (CONFIG_FAMILY[target], x.dtype == torch.float32, dot_precision(x.dtype),
                      target) if target is not None else None

    def runs_on(self, targets) -> bool:
        """Whether the compile target of this GPU is one of `targets` (csrc_triton/backward.py
        GROUP_DX_TARGETS, DROPOUT_BITS_TARGETS); off a GPU (the interpreter) always."""
        return self.tuned is None or self.tuned[3] in targets

    def largest(self, name: str, block: str) -> int:
        """The largest `block` the kernel may run with (split boundaries are aligned to it)."""
        configs = ([self.fixed[name]] if name in self.fixed
                   else self.kernels.config_list(name, *self.tuned))
        return max(c.kwargs[block] for c in configs)

    def smallest(self, name: str, block: str) -> int:
        """The smallest `block` the kernel may run with (counters are sized for its grid)."""
        configs = ([self.fixed[name]] if name in self.fixed
                   else self.kernels.config_list(name, *self.tuned))
        return min(c.kwargs[block] for c in configs)

    def launch(self, name: str, grid, args: tuple, consts: dict, options: Optional[dict] = None):
        """Run kernel `name`; grid(meta) -> grid tuple, meta holding the BLOCK_* sizes."""
        options = options or {}
        if name in self.fixed:
            cfg = self.fixed[name]
            self.kernels.KERNELS[name][grid(cfg.kwargs)](
                *args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **options)
        else:
            tuner = cached_autotuner(("backward", name, *self.tuned),
                                     lambda: self.kernels.build_autotuner(name, *self.tuned))
            tuner[grid](*args, **consts, **options)


def check_backward_args(dy, x, u, lora_A, lora_B, need_dB):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, n = x.shape[0], lora_B.shape[0]
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"dy must be a tensor, got {type(dy).__name__}")
    if tuple(dy.shape) != (m, n):
        raise ValueError(f"dy must be [M, N] = [{m}, {n}] (x's rows, the weight's "
                         f"out_features), got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy is {dy.dtype} but x is {x.dtype}: the output gradient must have "
                        "the forward's dtype")
    if dy.device != x.device:
        raise ValueError(f"dy is on {dy.device} but x is on {x.device}")
    rank = lora_A.shape[0]
    check_fused_rank(lora_A)
    if need_dB:
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"u must be the [M, r] tensor saved by the forward, got "
                            f"{type(u).__name__}")
        if tuple(u.shape) != (m, rank) or u.dtype != x.dtype or u.device != x.device:
            raise ValueError(f"u must be [{m}, {rank}] {x.dtype} on {x.device} (saved by the "
                             f"forward), got {tuple(u.shape)} {u.dtype} on {u.device}")


@kernel_entry
def lora_backward(dy: torch.Tensor, x: torch.Tensor, u: Optional[torch.Tensor],
                  packed: torch.Tensor, state: QuantState, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scaling: float, p: float, seed, need_dx: bool,
                  need_dA: bool, need_dB: bool, *, config: Optional[dict] = None,
                  base: Optional[str] = None):
    """Gradients of y = x @ deq(W)^T + s * dropout(x) @ A^T @ B^T (+ bias) for one layer.

    dy [M, N] and x [M, K] (any strides) in fp16/bf16/fp32; u [M, r] = dropout(x) @ A^T as the
    forward saved it (only read for dB); packed/state the 4-bit W [N, K]; lora_A [r, K],
    lora_B [N, r] in x's dtype; p, seed: the forward's dropout (p = 0: none; seed an int or
    the forward's fastlora.checks.DeviceSeed, read on the device).
    Returns (dx [M, K] in x's dtype or None, dA [r, K] in lora_A's dtype or None,
    dB [N, r] in lora_B's dtype or None), computing only what `need_*` asks for.
    config: optional {"du_db" | "da" | "dx": {BLOCK_*: .., "num_warps": .., "num_stages": ..}}
    pinning a kernel's config (debugging, benchmarks); the others are autotuned on a GPU.
    base: the dx product's path, None/'auto' (launch/dispatch.py decides), 'fused' or
    'dequant'; a "dx" entry in `config` pins the fused path.
    """
    p, _ = check_inputs(x, packed, state, lora_A, lora_B, scaling, None, p, True, None,
                        allowed_dtypes=ACTIVATION_DTYPES)
    check_seed_arg(seed)
    check_backward_args(dy, x, u, lora_A, lora_B, need_dB)
    m, k = x.shape
    n, rank = lora_B.shape
    need_du = bool(need_dx or need_dA)
    if m == 0 or not (need_du or need_dB):
        return (x.new_empty(m, k) if need_dx else None,
                torch.zeros_like(lora_A) if need_dA else None,
                torch.zeros_like(lora_B) if need_dB else None)
    cfgs = Configs(x, config)
    du, dB = du_db(cfgs, dy, u, lora_B, scaling, need_du, need_dB)
    if not need_du:
        return None, None, dB
    dx, dA = dx_and_da(cfgs, dy, x, du, lora_A, p, seed, packed, state, need_dx, need_dA,
                       base=base, pinned="dx" in (config or {}))
    return dx, dA, dB


def _f32(device) -> dict:
    return dict(dtype=torch.float32, device=device)


def du_db(cfgs: Configs, dy, u, lora_B, scaling: float, need_du: bool, need_dB: bool,
          segments=None):
    """(dU = s * dy @ B [M, r] in dy's dtype or None, dB = s * dy^T @ U [N, r] in lora_B's
    dtype or None): one pass over dy, split over M (for dB) x N (for dU), partials reduced in
    a fixed order inside the launch. segments (fastlora.launch.mixed.Segments, a mixed batch; scaling 1): dU
    keeps each row's own adapter's columns, times that adapter's scaling."""
    m, n = dy.shape
    rank = lora_B.shape[1]
    width = _parallelism(dy.device)
    r_pad = max(16, triton.next_power_of_2(rank))
    rows_per_split, splits = _parts(m, cfgs.largest("du_db", "BLOCK_M"),
                                    round(math.sqrt(width * m / n)))
    cols_per_group, groups = _parts(n, cfgs.largest("du_db", "BLOCK_N"),
                                    triton.cdiv(width, splits))
    unused = torch.empty(0, **_f32(dy.device))  # stands for a workspace a flag switches off
    ws_du = torch.empty((groups, m, rank), **_f32(dy.device)) if need_du else unused
    ws_db = torch.empty((splits, n, rank), **_f32(dy.device)) if need_dB else unused
    u_arg = u if need_dB else lora_B  # unread when dB is not needed
    du = dy.new_empty(m, rank) if need_du else dy  # dy, lora_B: unwritten when off
    dB = lora_B.new_empty(n, rank) if need_dB else lora_B
    cfgs.launch("du_db", lambda meta: (splits, groups),
                (dy, u_arg, lora_B, ws_du, ws_db, du, dB,
                 arrival_counters(dy.device, splits + groups), m, n, rank, rows_per_split,
                 cols_per_group, m_bucket_of(m), float(scaling), dy.stride(0), dy.stride(1),
                 u_arg.stride(0), u_arg.stride(1),
                 lora_B.stride(0), lora_B.stride(1),
                 *(segments.du_tables() if segments is not None else (unused,) * 3)),
                dict(COMPUTE_DU=need_du, COMPUTE_DB=bool(need_dB),
                     SEGMENTED=segments is not None, R_PAD=r_pad,
                     DOT_PRECISION=dot_precision(dy.dtype)))
    return (du if need_du else None), (dB if need_dB else None)


def da(cfgs: Configs, x, du, lora_A, p: float, seed, dx, need_dA: bool, segments=None,
       bits: Optional[torch.Tensor] = None):
    """dA = dU^T @ dropout(x) (returned, or None) and dx := dropout'(dU @ A) (when dx is a
    tensor) or bits := the dropout mask (int32 [M, K / 32], for the dx GEMM: LoraTerm): one
    pass over x, split over M (for dA), the splits summed inside the launch.
    segments (a mixed batch): each row's
    dropout is its adapter's (p: whether any adapter has dropout)."""
    m, k = x.shape
    rank = lora_A.shape[0]
    width = _parallelism(x.device)
    r_pad = max(16, triton.next_power_of_2(rank))
    k_tiles = triton.cdiv(k, cfgs.largest("da", "BLOCK_K"))
    rows_per_split, splits = _parts(m, cfgs.largest("da", "BLOCK_M"), triton.cdiv(width, k_tiles))
    ws_da = torch.empty((splits, rank, k), **_f32(x.device)) if need_dA \
        else torch.empty(0, **_f32(x.device))
    dA = lora_A.new_empty(rank, k) if need_dA else lora_A  # unwritten when dA is not needed
    dx_arg = dx if dx is not None else x  # unwritten when dx is not needed
    counters = arrival_counters(x.device, triton.cdiv(k, cfgs.smallest("da", "BLOCK_K")))
    cfgs.launch("da", lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), splits),
                (x, du, lora_A, ws_da, dA, counters, dx_arg, m, k, rank,
                 *seed_args(seed, p, x.device), dropout_threshold(p),
                 1.0 / (1.0 - p), rows_per_split, m_bucket_of(m), x.stride(0), x.stride(1),
                 du.stride(0), du.stride(1), lora_A.stride(0), lora_A.stride(1),
                 dx_arg.stride(0), dx_arg.stride(1),
                 *(segments.da_tables() if segments is not None else (ws_da,) * 3),
                 bits if bits is not None else counters,  # unread without bits
                 bits.stride(0) if bits is not None else 0),
                dict(COMPUTE_DA=bool(need_dA), WRITE_DX=dx is not None,
                     WRITE_BITS=bits is not None, HAS_DROPOUT=p > 0.0,
                     DROPOUT_GROUPED=k % 8 == 0, SEGMENTED=segments is not None,
                     R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype)))
    return dA if need_dA else None


def dx_and_da(cfgs: Configs, dy, x, du, lora_A, p: float, seed, packed, state, need_dx: bool,
              need_dA: bool, *, base=None, pinned: bool = False, segments=None):
    """(dx or None, dA or None) from dU (du_db's): dx's LoRA term is made inside the fused dx
    GEMM for 16-bit activations with K on the blocksize, without dropout or with the dA
    kernel's mask bits where the GPU takes them (csrc_triton/backward.py
    DROPOUT_BITS_TARGETS; not a mixed batch's per-row dropout), else written by the dA kernel;
    the dA kernel runs even when dA is not wanted where the term or the bits are its.
    segments: a mixed batch's (launch/mixed.py; dU already masked and scaled per row, so
    without dropout its term is dU @ A_cat as well)."""
    m, k = x.shape
    dx = x.new_empty(m, k) if need_dx else None
    lora = None
    if x.dtype != torch.float32 and decode_flags(packed, state, k)["K_ALIGNED"]:
        if p == 0.0:
            lora = LoraTerm(du, lora_A)
        elif segments is None and k % 32 == 0 and _bits_here(cfgs):
            lora = LoraTerm(du, lora_A, torch.empty((m, k // 32), dtype=torch.int32,
                                                    device=x.device), 1.0 / (1.0 - p))
    path = dx_path(cfgs, dy, packed, state, dx, lora, base=base,
                   pinned=pinned) if need_dx else None
    in_gemm = path == "fused" and lora is not None
    bits = lora.bits if in_gemm else None  # filled by the dA kernel, before the GEMM reads it
    dA = None
    if need_dA or (need_dx and not in_gemm) or bits is not None:
        dA = da(cfgs, x, du, lora_A, p, seed, dx if need_dx and not in_gemm else None, need_dA,
                segments=segments, bits=bits)
    if path == "fused":
        _dx_launch(cfgs, dy, packed, state, dx, lora if in_gemm else None)
    elif path == "dequant":
        dispatch.dx_dequant(dy, packed, state, dx)
    return dx, dA


class LoraTerm(NamedTuple):
    """dx's LoRA term dropout'(dU @ A) for the dx GEMM to make before its loop: dU [M, r]
    (scaled by s) and lora_A [r, K] in dx's dtype; with dropout the dA kernel's mask bits
    (int32 [M, K / 32]) and keep_scale = 1 / (1 - p)."""
    du: torch.Tensor
    lora_A: torch.Tensor
    bits: Optional[torch.Tensor] = None
    keep_scale: float = 1.0


def _bits_here(cfgs: Configs) -> bool:
    """Whether dropout's mask enters the dx GEMM as bits on this device: the compile targets
    of csrc_triton/backward.py DROPOUT_BITS_TARGETS (none on Triton 3.5 / 3.6), and the
    interpreter wherever any GPU takes them; and the dA kernel's column tiles are whole 32-bit
    words (every shipped config; a pinned BLOCK_K of 16 is not)."""
    targets = cfgs.kernels.DROPOUT_BITS_TARGETS
    return bool(targets) and cfgs.runs_on(targets) and cfgs.smallest("da", "BLOCK_K") >= 32


def _dx_launch(cfgs: Configs, dy, packed, state, out, lora: Optional[LoraTerm] = None) -> None:
    """The fused dx GEMM into `out`: out = dropout'(dU @ A) + dy @ deq(W) when `lora` is given
    (16-bit, K on the blocksize), else out += dy @ deq(W) (out holding the LoRA term on
    entry)."""
    m, n = dy.shape
    k = out.shape[1]
    du, lora_A, bits, keep_scale = lora if lora is not None else (dy, dy, None, 1.0)
    bits_arg = bits if bits is not None else out  # unread without bits
    cfgs.launch("dx", lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) *
                                    triton.cdiv(k, meta["BLOCK_K"]),),
                (dy, *weight_args(packed, state), out, du, lora_A, bits_arg, m, n, k,
                 lora_A.shape[0] if lora is not None else 0, m_bucket_of(m),
                 dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
                 du.stride(0), du.stride(1), lora_A.stride(0), lora_A.stride(1),
                 bits.stride(0) if bits is not None else 0, keep_scale),
                dict(**decode_flags(packed, state, k), LORA=lora is not None,
                     DROPOUT_BITS=bits is not None, DOT_PRECISION=dot_precision(dy.dtype)),
                LAUNCH_OPTIONS)


def dx_path(cfgs: Configs, dy, packed, state, dx, lora: Optional[LoraTerm], *, base=None,
            pinned: bool = False) -> str:
    """'fused' (the dx GEMM: out = dU @ A + dy @ deq(W) with `lora`, out += dy @ deq(W)
    without) or 'dequant' (dequantize + cuBLAS adds dy @ deq(W) to the LoRA term the dA kernel
    wrote), as launch/dispatch.py decides; timing there runs each candidate on a scratch dx."""
    m, n = dy.shape
    return dispatch.choose("dx", dx, lambda out: _dx_launch(cfgs, dy, packed, state, out, lora),
                           lambda out: dispatch.dx_dequant(dy, packed, state, out),
                           n=n, k=dx.shape[1], m=m, base=base, pinned=pinned, accumulates=True)


def dx_gemm(cfgs: Configs, dy, packed, state, dx, *, base=None, pinned: bool = False) -> None:
    """dx += dy @ deq(W), dx holding a LoRA term on entry (a group's sum, a wide mixed batch's,
    DoRA's with dropout): the fused GEMM or dequantize + cuBLAS (launch/dispatch.py; `base` as in
    lora_forward, pinned: a "dx" config was given)."""
    m, n = dy.shape
    dispatch.run("dx", dx, lambda out: _dx_launch(cfgs, dy, packed, state, out),
                 lambda out: dispatch.dx_dequant(dy, packed, state, out),
                 n=n, k=dx.shape[1], m=m, base=base, pinned=pinned, accumulates=True)


def m_bucket_of(m: int) -> int:
    """The autotune key's M bucket (csrc_triton.common.m_bucket, the forward's rule)."""
    from csrc_triton.common import m_bucket

    return m_bucket(m)
