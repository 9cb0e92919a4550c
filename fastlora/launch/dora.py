"""Launchers of csrc_triton/dora.py.

    norm_partials(packed, state, lora_A, lora_B, s) -> fp32 [splits, N] sums of squares of
                                                       W + s B A, split over K
    scales(state, lora_B, ...)                      -> (norm, mns, QuantState of diag(c) W,
                                                        diag(mns) B, dm): one launch
    weight_norm(packed, state, lora_A, lora_B, s)   -> fp32 [N]  || W + s B A ||_row
    dropout(t, p, seed)                             -> dropout(t), the kernels' Philox mask
    combine(z, c, base=None, bias=None, shift=0)    -> base + bias + (c + shift) * z (fp32)
    col_dot(g, z)                                   -> fp32 [splits, N] parts of sum_m g * z

Inputs are checked by fastlora/ops/dora.py; these only launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..quant import QuantState
from ..reference import dropout_threshold
from .common import (LAUNCH_OPTIONS, decode_flags, dot_precision, kernel_entry, seed_args,
                     weight_args)

__all__ = ["norm_partials", "scales", "weight_norm", "dropout", "combine", "col_dot"]


def _kernels():
    from csrc_triton import dora

    return dora


@kernel_entry
def norm_partials(packed: torch.Tensor, state: QuantState, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 [splits, N]: sums of squares of deq(W) + scaling * lora_B @ lora_A over a fixed
    cut of K (one pass over the packed weight: W decoded in fp32, B @ A on tensor cores with
    an fp32 accumulator); `scales` adds them in order."""
    from .backward import _parallelism, _parts

    k = state.shape[1]
    n, rank = lora_B.shape
    kern = _kernels()
    row_tiles = triton.cdiv(n, kern.NORM_BLOCK_N)
    k_per_split, splits = _parts(k, kern.NORM_BLOCK_K,
                                 max(1, triton.cdiv(_parallelism(packed.device), row_tiles)))
    ws = torch.empty((splits, n), dtype=torch.float32, device=packed.device)
    kern._dora_norm_kernel[(row_tiles, splits)](
        *weight_args(packed, state), lora_A, lora_B, ws, n, k, rank, k_per_split,
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), float(scaling),
        **decode_flags(packed, state, k), PRECISION=dot_precision(lora_A.dtype),
        BLOCK_N=kern.NORM_BLOCK_N, BLOCK_K=kern.NORM_BLOCK_K, BLOCK_R=kern.rank_block(rank),
        num_warps=kern.NORM_NUM_WARPS, **LAUNCH_OPTIONS)
    return ws


@kernel_entry
def scales(state: QuantState, lora_B: torch.Tensor, *, ws: Optional[torch.Tensor] = None,
           magnitude: Optional[torch.Tensor] = None, mns: Optional[torch.Tensor] = None,
           shift: float = 0.0, tiny: float = 0.0, scale_weight: bool = True,
           scale_b: bool = True, dm_parts: Optional[torch.Tensor] = None,
           norm: Optional[torch.Tensor] = None, dm_over_mns: bool = False,
           dm_dtype: torch.dtype = torch.float32) -> tuple:
    """(norm, mns, state_c, b_scaled, dm) in one launch (csrc_triton/dora._dora_scales_kernel).

    From `ws` (norm_partials) and `magnitude`: norm = sqrt(sum of the partials), mns =
    magnitude / norm (`tiny` where that is 0), both fp32 [N]; or from a given fp32 `mns`
    (norm None). state_c: the QuantState of diag(mns + shift) @ deq(W) (fp32 absmax, the packed
    bytes unchanged; every quantisation block lies in one row: K % blocksize == 0, which the
    DoRA op requires), or None without scale_weight; b_scaled = diag(mns) @ lora_B in its
    dtype, or None without scale_b. With `dm_parts` (col_dot's, from a given mns and `norm`):
    dm = sum of the parts / norm (/ mns too when dm_over_mns) in dm_dtype, else dm None."""
    kern = _kernels()
    n, k = state.shape
    rank = lora_B.shape[1]
    dev = lora_B.device
    f32 = dict(dtype=torch.float32, device=dev)
    from_ws = ws is not None
    if from_ws:
        norm, mns = torch.empty(n, **f32), torch.empty(n, **f32)
    dm = torch.empty(n, dtype=dm_dtype, device=dev) if dm_parts is not None else None
    per_row = k // state.blocksize
    absmax = torch.empty(n * per_row, **f32) if scale_weight else mns
    b_scaled = torch.empty((n, rank), dtype=lora_B.dtype, device=dev) if scale_b else lora_B
    raw = weight_args(state.absmax.new_empty(0, dtype=torch.uint8), state)  # no packed bytes
    unused = mns  # stands for a pointer a flag switches off
    kern._dora_scales_kernel[(triton.cdiv(n, kern.SCALES_BLOCK_N),)](
        ws if from_ws else unused, magnitude if from_ws else unused, mns,
        norm if norm is not None else unused, *raw[1:5], lora_B, absmax, b_scaled,
        dm_parts if dm is not None else unused, dm if dm is not None else unused, n, rank,
        ws.shape[0] if from_ws else 0, dm_parts.shape[0] if dm is not None else 0, per_row,
        lora_B.stride(0), lora_B.stride(1), float(shift), float(tiny), FROM_WS=from_ws,
        DOUBLE_QUANT=state.nested, WRITE_ABSMAX=scale_weight, WRITE_B=scale_b,
        WRITE_DM=dm is not None, DM_OVER_MNS=dm_over_mns, BLOCK_N=kern.SCALES_BLOCK_N,
        BLOCK_Q=kern.SCALES_BLOCK_Q, BLOCK_R=kern.SCALES_BLOCK_R, num_warps=kern.EW_NUM_WARPS,
        **LAUNCH_OPTIONS)
    state_c = None
    if scale_weight:
        state_c = QuantState(absmax=absmax, shape=state.shape, code=state.code,
                             blocksize=state.blocksize, quant_type=state.quant_type,
                             dtype=state.dtype)
    return norm, mns, state_c, b_scaled if scale_b else None, dm


def weight_norm(packed: torch.Tensor, state: QuantState, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 [N]: the row norms of deq(W) + scaling * lora_B @ lora_A."""
    ws = norm_partials(packed, state, lora_A, lora_B, scaling)
    ones = torch.ones(state.shape[0], dtype=torch.float32, device=lora_B.device)
    return scales(state, lora_B, ws=ws, magnitude=ones, scale_weight=False, scale_b=False)[0]


@kernel_entry
def dropout(t: torch.Tensor, p: float, seed) -> torch.Tensor:
    """dropout(t) for 2-D t [M, K] with the mask every fused kernel draws for (seed, p)
    (fastlora.reference.apply_dropout, bit for bit); a new tensor in t's dtype."""
    kern = _kernels()
    m, k = t.shape
    out = torch.empty((m, k), dtype=t.dtype, device=t.device)
    if t.numel():
        kern._dropout_kernel[(triton.cdiv(m, kern.EW_BLOCK_M), triton.cdiv(k, kern.EW_BLOCK_N))](
            t, out, m, k, t.stride(0), t.stride(1), out.stride(0), out.stride(1),
            *seed_args(seed, p, t.device), dropout_threshold(p), 1.0 / (1.0 - p),
            GROUPED=k % 8 == 0, BLOCK_M=kern.EW_BLOCK_M, BLOCK_K=kern.EW_BLOCK_N,
            num_warps=kern.EW_NUM_WARPS)
    return out


@kernel_entry
def combine(z: torch.Tensor, c: torch.Tensor, base=None, bias=None,
            shift: float = 0.0) -> torch.Tensor:
    """base + bias + (c + shift) * z for z [M, N] (c fp32 [N]; base [M, N] and bias [N]
    optional, in z's dtype), computed in fp32 and rounded once to z's dtype."""
    kern = _kernels()
    m, n = z.shape
    out = torch.empty((m, n), dtype=z.dtype, device=z.device)
    if z.numel():
        base_arg = base if base is not None else z
        bias_arg = bias.contiguous() if bias is not None else c
        kern._dora_combine_kernel[(triton.cdiv(m, kern.EW_BLOCK_M),
                                   triton.cdiv(n, kern.EW_BLOCK_N))](
            z, base_arg, c.contiguous(), bias_arg, out, m, n, z.stride(0), z.stride(1),
            base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1), float(shift),
            HAS_BASE=base is not None, HAS_BIAS=bias is not None, BLOCK_M=kern.EW_BLOCK_M,
            BLOCK_N=kern.EW_BLOCK_N, num_warps=kern.EW_NUM_WARPS)
    return out


@kernel_entry
def col_dot(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """fp32 [splits, N]: sums over rows of g * z (both [M, N]), M cut into a fixed number of
    parts (`scales` adds them in order: deterministic for a given shape)."""
    from .backward import _parallelism, _parts

    kern = _kernels()
    m, n = g.shape
    col_tiles = triton.cdiv(n, kern.EW_BLOCK_N)
    rows_per_split, splits = _parts(m, kern.COL_BLOCK_M,
                                    max(1, triton.cdiv(_parallelism(g.device), col_tiles)))
    ws = torch.empty((splits, n), dtype=torch.float32, device=g.device)
    kern._col_dot_kernel[(col_tiles, splits)](
        g, z, ws, m, n, rows_per_split, g.stride(0), g.stride(1), z.stride(0), z.stride(1),
        BLOCK_M=kern.COL_BLOCK_M, BLOCK_N=kern.EW_BLOCK_N, num_warps=kern.EW_NUM_WARPS)
    return ws
