"""Launcher of a mixed batch: several LoRA adapters over one 4-bit base, each row of x routed to
one of them (or to none), the base GEMM run once for the whole batch.

The G adapters sit side by side along the rank (A_cat [R, K], B_cat [N, R], R = their summed
rank; fastlora/ops/mixed.py concatenates them inside the autograd graph). Row m belongs to slot
g = row_seg[m] (-1: the base alone) and column r to slot col_seg[r]:

    U'[m, r] = s_g * (dropout_g(x) @ A_cat^T)[m, r]   where col_seg[r] == row_seg[m], else 0
    y        = x @ deq(W)^T + U' @ B_cat^T + bias        (the plain fused pass, scaling 1)

so each row gets exactly its own adapter's term, and the plain backward on (A_cat, B_cat, U')
gives each adapter exactly the gradients its own rows give it:

    dU' = (dy @ B_cat) * s_g, masked like U'     dB_cat = dy^T @ U'
    dA_cat = dU'^T @ dropout(x)                 dx = dy @ deq(W) + dropout'(dU' @ A_cat)

The mask and the scalings are applied inside the kernels that exist anyway (the U kernel's
store, the dU kernel's partials; csrc_triton.common.segment_factor), and each row draws dropout
with its own adapter's p (row_dropout): the same launches as one plain layer, no gather or
scatter of rows. The cost of the sharing is R instead of r columns in the small products (U,
the epilogue, dU/dB/dA): at 16 adapters of rank 16 and K = N = 4096, 6% of the base GEMM's
FLOPs (modelled in fastlora/bench/mixed.py).

Wide batches (padded summed rank above WIDE_RANK, no dropout) run the small products as
matmuls (cuBLAS on a GPU) with the mask and scalings applied by one elementwise pass (the
`factor` [M, R]): at R = 256 they are GEMMs of their own, where the rank-wide LoRA kernels'
hot loops reach 0.06-0.36 of HBM bandwidth (the dU/dB kernel's dB workspace is read and
written per row block; compile report rows at R_PAD 256). The base products stay fused.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..checks import MAX_FUSED_RANK
from ..reference import dropout_threshold
from .backward import Configs, check_backward_args, du_db, dx_and_da, dx_gemm
from .common import dot_precision, kernel_entry, prepared_entry
from .forward import (_launch_u, _u_launcher, check_forward_args, forward_with_u,
                      prepare_small_m_with_u, prepared_u_then_y)

__all__ = ["Segments", "segments", "mixed_forward", "mixed_backward", "mixed_problem",
           "prepare_mixed_small_m", "wide", "WIDE_RANK"]

# summed padded ranks above this (without dropout) take matmuls for the LoRA-side products
WIDE_RANK = 64


class Segments(NamedTuple):
    """A mixed batch's routing on x's device: row_seg int32 [M] (slot per row, -1: none),
    col_seg int32 [R] (slot per rank column), col_scale fp32 [R] (its adapter's scaling),
    seg_thr int32 [G] / seg_keep fp32 [G] (each slot's dropout threshold and 1 / (1 - p)),
    has_dropout (any p > 0)."""
    row_seg: torch.Tensor
    col_seg: torch.Tensor
    col_scale: torch.Tensor
    seg_thr: torch.Tensor
    seg_keep: torch.Tensor
    has_dropout: bool

    def u_tables(self) -> tuple:
        return self.row_seg, self.col_seg, self.col_scale, self.seg_thr, self.seg_keep

    def du_tables(self) -> tuple:
        return self.row_seg, self.col_seg, self.col_scale

    def da_tables(self) -> tuple:
        return self.row_seg, self.seg_thr, self.seg_keep

    def factor(self) -> torch.Tensor:
        """fp32 [M, R]: col_scale[r] where column r is row m's adapter's, else 0 (what the
        kernels' segment_factor computes, for the wide path)."""
        return (self.row_seg[:, None] == self.col_seg[None, :]) * self.col_scale[None, :]


def _factored(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The wide route's mask-and-scale pass: t [M, R] times Segments.factor() in fp32, back in
    t's dtype."""
    return t.float().mul_(factor).to(t.dtype)


def wide(seg: Segments, rank: int) -> bool:
    """Whether a mixed batch of summed rank `rank` takes the matmul route (module docstring)."""
    from csrc_triton.forward import rank_block

    return rank_block(rank) > WIDE_RANK and not seg.has_dropout


def mixed_problem(ranks) -> str | None:
    """Why adapters of these ranks cannot share one fused pass, or None: their summed rank is
    the fused kernels' rank (at most MAX_FUSED_RANK)."""
    if not ranks:
        return "a mixed batch needs at least one adapter"
    if sum(ranks) > MAX_FUSED_RANK:
        return (f"the adapters' ranks {list(ranks)} sum to {sum(ranks)} > {MAX_FUSED_RANK}, "
                "the fused kernels' rank")
    return None


@functools.lru_cache(maxsize=64)
def _tables(ranks: tuple, scalings: tuple, ps: tuple, device: torch.device) -> tuple:
    """The per-column and per-slot tables, built once per adapter set and device (a host to
    device copy of a few hundred bytes, not repeated at every layer call)."""
    col_seg = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32),
                                      torch.tensor(ranks))
    col_scale = torch.repeat_interleave(torch.tensor(scalings, dtype=torch.float32),
                                        torch.tensor(ranks))
    seg_thr = torch.tensor([dropout_threshold(p) for p in ps], dtype=torch.int32)
    seg_keep = torch.tensor([1.0 / (1.0 - p) for p in ps], dtype=torch.float32)
    return tuple(t.to(device) for t in (col_seg, col_scale, seg_thr, seg_keep))


def segments(row_seg: torch.Tensor, ranks, scalings, ps) -> Segments:
    """Segments for rows routed by row_seg (int32 [M] on x's device) to adapters of these
    ranks, scalings and effective dropout p."""
    tables = _tables(tuple(int(r) for r in ranks), tuple(float(s) for s in scalings),
                     tuple(float(p) for p in ps), row_seg.device)
    return Segments(row_seg, *tables, has_dropout=any(p > 0.0 for p in ps))


def _check(x, packed, state, lora_A, lora_B, bias, seg: Segments, seed) -> None:
    check_forward_args(x, packed, state, lora_A, lora_B, 1.0, bias, 0.0, seed)
    m, rank = x.shape[0], lora_A.shape[0]
    if seg.row_seg.dtype != torch.int32 or tuple(seg.row_seg.shape) != (m,) \
            or seg.row_seg.device != x.device:
        raise ValueError(f"row_seg must be int32 [{m}] on {x.device}, got "
                         f"{seg.row_seg.dtype} {tuple(seg.row_seg.shape)} on {seg.row_seg.device}")
    if tuple(seg.col_seg.shape) != (rank,):
        raise ValueError(f"the adapters' ranks sum to {seg.col_seg.shape[0]} but lora_A has "
                         f"{rank} rows")


@kernel_entry
def mixed_forward(x, packed, state, lora_A, lora_B, bias, seg: Segments, seed: int, *,
                  base=None):
    """(y [M, N], u' [M, R]) for 2-D x [M, K] (any strides), lora_A [R, K] / lora_B [N, R] the
    adapters side by side (in x's dtype), routed by `seg`; u' as the module docstring says
    (saved for the backward)."""
    _check(x, packed, state, lora_A, lora_B, bias, seg, seed)
    m = x.shape[0]
    u = torch.empty((m, lora_A.shape[0]), dtype=x.dtype, device=x.device)
    if m == 0:
        return torch.empty((m, lora_B.shape[0]), dtype=x.dtype, device=x.device), u
    if wide(seg, lora_A.shape[0]):
        u = _factored(x @ lora_A.t(), seg.factor())
    else:  # p only switches dropout on: each slot's threshold and scale come from seg
        _launch_u(x, lora_A, u, 0.5 if seg.has_dropout else 0.0, seed,
                  dot_precision(x.dtype), segments=seg)
    return forward_with_u(x, packed, state, u, lora_B, 1.0, bias, base=base), u


def prepare_mixed_small_m(x, packed, state, lora_A, lora_B, bias, seg: Segments):
    """mixed_forward's y at M <= SMALL_M_MAX without dropout for inputs shaped like x [M, K],
    its launch arguments prepared once (issue 29, as launch/forward.py prepare_small_m): a
    callable (x2) -> y [M, N] running the same launches on the same arguments as
    mixed_forward(x2, ...)[0] (U masked and scaled per row, then the small-M GEMM from it;
    a wide batch's U by one matmul and the cached per-row factor). None when a call would
    not take that path without deciding something first (prepare_small_m_with_u says when)
    or `seg` has dropout. The caller has checked the arguments and keeps the callable only
    while they stay what they were."""
    _check(x, packed, state, lora_A, lora_B, bias, seg, 0)
    if seg.has_dropout:
        return None
    y_launch = prepare_small_m_with_u(x, packed, state, lora_B, 1.0, bias)
    if y_launch is None:
        return None
    m, rank, dtype = x.shape[0], lora_A.shape[0], x.dtype
    if wide(seg, rank):
        factor, a_t = seg.factor(), lora_A.t()

        @prepared_entry
        def run(x2):
            return y_launch(x2, _factored(x2 @ a_t, factor))
        return run
    u_launch = _u_launcher(lora_A, m, dtype, 0.0, 0, dot_precision(dtype), segments=seg)
    return prepared_u_then_y(u_launch, y_launch, x, rank)


@kernel_entry
def mixed_backward(dy, x, u, packed, state, lora_A, lora_B, seg: Segments, seed: int,
                   need_dx: bool, need_dA: bool, need_dB: bool, *, base=None):
    """(dx [M, K] or None, dA_cat [R, K] or None, dB_cat [N, R] or None) of mixed_forward's y
    for dy [M, N]: the plain backward's kernels on the side-by-side adapters, dU masked and
    scaled per row, dropout per row."""
    _check(x, packed, state, lora_A, lora_B, None, seg, seed)
    check_backward_args(dy, x, u, lora_A, lora_B, need_dB)
    m, k = x.shape
    need_du = bool(need_dx or need_dA)
    if m == 0 or not (need_du or need_dB):
        return (x.new_zeros(m, k) if need_dx else None,
                torch.zeros_like(lora_A) if need_dA else None,
                torch.zeros_like(lora_B) if need_dB else None)
    cfgs = Configs(x, None)
    if wide(seg, lora_A.shape[0]):
        dB = (dy.t() @ u) if need_dB else None
        du = _factored(dy @ lora_B, seg.factor()) if need_du else None
        dx = (du @ lora_A) if need_dx else None
        dA = (du.t() @ x) if need_dA else None
    else:
        du, dB = du_db(cfgs, dy, u, lora_B, 1.0, need_du, need_dB, segments=seg)
        if not need_du:
            return None, None, dB
        # p only switches dropout on (per-row thresholds come from seg)
        dx, dA = dx_and_da(cfgs, dy, x, du, lora_A, 0.5 if seg.has_dropout else 0.0, seed,
                           packed, state, need_dx, need_dA, base=base, segments=seg)
        return dx, dA, dB
    if need_dx:
        dx_gemm(cfgs, dy, packed, state, dx, base=base)
    return dx, dA, dB
