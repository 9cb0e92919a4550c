"""`fastlora.dora_linear_4bit`: a DoRA layer over a 4-bit base (QDoRA), PEFT's semantics
(fastlora.reference.dora_linear_4bit says them), on the kernels, never materialising deq(W)
or B @ A.

With z = dropout(x) @ W^T + s * U @ B^T and U = dropout(x) @ A^T (the plain fused layer's
base-free output on dropout(x)), norm = || W + s B A ||_row (detached) and mns = m / norm:

    p = 0   y = mns * z + bias
    p > 0   y = (x @ W^T + s * U @ B^T + bias) + (mns - 1) * z    (the plain fused layer's y)

so the forward is the norm kernel, the plain layer's GEMM once (twice with dropout: x and
dropout(x) are different products) and one fp32 combine. Without dropout or bias (Llama's,
Mistral's projections) the combine goes too: y = x @ W'^T + s * U @ B'^T is the plain fused
forward on W' = diag(mns) W, read packed through a row-scaled absmax
(fastlora.launch.dora.scales), and B' = diag(mns) @ B; y is saved and z = y / mns. (With a
bias, y - bias would cancel digits before that division: those layers keep the combine.)
The backward, with B' again and W' (or diag(mns - 1) W) read packed the same way:

    p = 0   (dx, dA, dB') = plain backward of (x, W' = diag(mns) W, B')
    p > 0   (dxd, dA, dB') = plain backward without dropout of (dropout(x), diag(mns - 1) W,
            B'); dx = dropout(dxd) + dy @ W
    dB = diag(mns) dB',  dm = sum_m dy * z / norm,  dbias = sum_m dy

It saves x, U, z (or y) and the norm (never W, never a mask: dropout(x) is redrawn from the
seed).

Two torch.library custom ops, fastlora::dora_fwd and fastlora::dora_bwd, joined by
register_autograd (as the plain op's), so torch.compile sees opaque nodes. fp64 inputs, the
reference backend and empty inputs run fastlora.reference.dora_linear_4bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import (ACTIVATION_DTYPES, MAX_FUSED_RANK, as_quant_state, check_fused_rank,
                      check_inputs, check_magnitude, dora_fused_problem, DeviceSeed, seed_high,
                      seed_tensor)
from ..launch.selfcheck import use_kernels
from ..quant import QuantState
from .linear import _autocast_inputs, _state_from_args, _state_to_args

__all__ = ["dora_linear_4bit", "prepare_dora_linear_4bit"]


_TINY = 2.0**-64  # stands for mns = 0 on the scaled path (see _dora_fwd)


def _forward(x, packed, state, magnitude, lora_A, lora_B, bias, scaling, p, seed):
    """(y, u, z, norm, mns) of the DoRA forward on the kernels; z is None on the scaled path
    (no dropout, no bias), where y itself stands for it (y = mns * z)."""
    from ..launch import dora
    from ..launch.forward import forward_with_u, lora_forward

    ws = dora.norm_partials(packed, state, lora_A, lora_B, scaling)
    if p == 0.0 and bias is None:
        # y = x @ (diag(mns) W)^T + s * U @ (diag(mns) B)^T: the plain fused forward on the
        # row-scaled weight, no extra pass. A zero magnitude row takes mns = 2^-64 instead of 0
        # (y then 2^-64 * z, not 0), so that z = y / mns stays recoverable for its gradient
        norm, mns, state_m, b_m, _ = dora.scales(state, lora_B, ws=ws, magnitude=magnitude,
                                                 tiny=_TINY)
        y, u = lora_forward(x, packed, state_m, lora_A, b_m, scaling, None, 0.0, seed)
        return y, u, None, norm, mns
    norm, mns = dora.scales(state, lora_B, ws=ws, magnitude=magnitude, scale_weight=False,
                            scale_b=False)[:2]
    if p == 0.0:
        z, u = lora_forward(x, packed, state, lora_A, lora_B, scaling, None, 0.0, seed)
        return dora.combine(z, mns, bias=bias), u, z, norm, mns
    y_plain, u = lora_forward(x, packed, state, lora_A, lora_B, scaling, bias, p, seed)
    z = forward_with_u(dora.dropout(x, p, seed), packed, state, u, lora_B, scaling, None)
    return dora.combine(z, mns, base=y_plain, shift=-1.0), u, z, norm, mns


def _backward(dy, x, u, z, norm, mns, packed, state, lora_A, lora_B, scaling, p, seed,
              scaled, need_dx, need_dm, need_dA, need_dB):
    """(dx, dm in fp32, dA, dB), each None when not needed; z: y on the scaled path."""
    from ..launch import dora
    from ..launch.backward import Configs, dx_gemm, lora_backward

    dx = dA = dB = None
    need_lora = need_dx or need_dA or need_dB
    # one launch: diag(mns) W without dropout, diag(mns - 1) W with it, diag(mns) B, and
    # dm = sum_m dy * z / norm from the column dot's parts (over mns too on the scaled path)
    _, _, state_c, b_m, dm = dora.scales(
        state, lora_B, mns=mns, shift=0.0 if p == 0.0 else -1.0, scale_weight=need_lora,
        scale_b=need_lora, dm_parts=dora.col_dot(dy, z) if need_dm else None, norm=norm,
        dm_over_mns=scaled)
    if need_lora:
        if p == 0.0:
            dx, dA, dB = lora_backward(dy, x, u, packed, state_c, lora_A, b_m, scaling, 0.0,
                                       seed, need_dx, need_dA, need_dB)
        else:
            dxd, dA, dB = lora_backward(dy, dora.dropout(x, p, seed), u, packed, state_c,
                                        lora_A, b_m, scaling, 0.0, seed, need_dx, need_dA,
                                        need_dB)
            if need_dx:
                dx = dora.dropout(dxd, p, seed)
                dx_gemm(Configs(x, None), dy, packed, state, dx)  # dx += dy @ W
        if dB is not None:
            dB.mul_(mns[:, None])  # diag(mns) dB': in fp32, rounded once to dB's dtype
    return dx, dm, dA, dB


# ----------------------------------------------------------------------------- custom ops
# As fastlora::lora_fwd / lora_bwd (ops/linear.py): opaque nodes for torch.compile. The weight
# travels as its tensors (ops/linear.py's _state_to_args); outputs never alias each other, so
# the scaled path returns an empty z and setup_context saves y in its place.

@torch.library.custom_op("fastlora::dora_fwd", mutates_args=())
def _dora_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
              absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], code: torch.Tensor, magnitude: torch.Tensor,
              lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor],
              scaling: float, p: float, seed: torch.Tensor, seed_high: int, blocksize: int,
              quant_type: str, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             n_out, x.shape[1], x.dtype)
    y, u, z, norm, mns = _forward(x, packed, state, magnitude, lora_A, lora_B, bias, scaling,
                                  p, DeviceSeed(seed, seed_high))
    return y, u, z if z is not None else x.new_empty(0), norm, mns


@_dora_fwd.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, magnitude, lora_A, lora_B, bias,
      scaling, p, seed, seed_high, blocksize, quant_type, n_out):
    m = x.shape[0]
    scaled = p == 0.0 and bias is None
    return (x.new_empty(m, n_out), x.new_empty(m, lora_A.shape[0]),
            x.new_empty(0) if scaled else x.new_empty(m, n_out),
            x.new_empty(n_out, dtype=torch.float32), x.new_empty(n_out, dtype=torch.float32))


@torch.library.custom_op("fastlora::dora_bwd", mutates_args=())
def _dora_bwd(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, z: torch.Tensor,
              norm: torch.Tensor, mns: torch.Tensor, packed: torch.Tensor,
              absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
              code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
              code: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              p: float, seed: torch.Tensor, seed_high: int, blocksize: int, quant_type: str,
              scaled: bool, need_dx: bool, need_dm: bool, need_dA: bool, need_dB: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             lora_B.shape[0], x.shape[1], x.dtype)
    grads = _backward(dy, x, u, z, norm, mns, packed, state, lora_A, lora_B, scaling, p,
                      DeviceSeed(seed, seed_high), scaled, need_dx, need_dm, need_dA, need_dB)
    # custom ops cannot return None: a fresh empty tensor stands for "none"
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_dora_bwd.register_fake
def _(dy, x, u, z, norm, mns, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B,
      scaling, p, seed, seed_high, blocksize, quant_type, scaled, need_dx, need_dm, need_dA,
      need_dB):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            norm.new_empty(norm.shape) if need_dm else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_dA else x.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, offset, code, magnitude, lora_A, lora_B, bias, scaling,
     p, seed, seed_high, blocksize, quant_type, n_out) = inputs
    y, u, z, norm, mns = output
    ctx.scaled = p == 0.0 and bias is None
    # the scaled path saves its output y as z (autograd checks it is not modified in place
    # before backward, and raises if it is)
    ctx.save_for_backward(x, u, y if ctx.scaled else z, norm, mns, packed, absmax, absmax2,
                          code2, offset, code, lora_A, lora_B, seed)
    ctx.scalars = (scaling, p, seed_high, blocksize, quant_type)
    ctx.has_bias = bias is not None
    ctx.magnitude_dtype = magnitude.dtype


def _autograd_backward(ctx, dy, *_unused):
    (x, u, z, norm, mns, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B,
     seed) = ctx.saved_tensors
    scaling, p, seed_high, blocksize, quant_type = ctx.scalars
    needs = ctx.needs_input_grad
    need_dx, need_dm, need_dA, need_dB, need_bias = needs[0], needs[7], needs[8], needs[9], \
        needs[10]
    dx = dm = dA = dB = dbias = None
    if need_dx or need_dm or need_dA or need_dB:
        dx, dm, dA, dB = _dora_bwd(dy.contiguous(), x, u, z, norm, mns, packed, absmax,
                                   absmax2, code2, offset, code, lora_A, lora_B, scaling, p,
                                   seed, seed_high, blocksize, quant_type, ctx.scaled, need_dx,
                                   need_dm,
                                   need_dA, need_dB)
        dx = dx if need_dx else None
        dm = dm.to(ctx.magnitude_dtype) if need_dm else None
        dA = dA if need_dA else None
        dB = dB if need_dB else None
    if need_bias and ctx.has_bias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return (dx, None, None, None, None, None, None, dm, dA, dB, dbias, None, None, None, None,
            None, None, None)


_dora_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def dora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     magnitude: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, training: bool = False,
                     seed: Optional[int] = None) -> torch.Tensor:
    """PEFT's DoRA layer over a bitsandbytes 4-bit base, differentiable in x, magnitude,
    lora_A, lora_B and bias (fastlora.reference.dora_linear_4bit is its definition).

    Arguments as fastlora.lora_linear_4bit, plus magnitude [N] (PEFT's lora_magnitude_vector,
    any float dtype; its gradient comes back in that dtype). Dropout (p > 0 when `training`)
    enters as PEFT's does: the base term is then read on both x and dropout(x). The fused path
    needs in_features to be a multiple of the quantisation blocksize (ValueError otherwise:
    use fastlora.reference.dora_linear_4bit)."""
    x, lora_A, lora_B, bias = _autocast_inputs(x, lora_A, lora_B, bias)
    state = as_quant_state(state)
    p, seed = check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, dropout_p, training,
                           seed)
    check_magnitude(magnitude, x, state.shape[0])
    if x.dtype == torch.float64 or x.numel() == 0 or not use_kernels(x, state.quant_type):
        from .. import reference

        with torch.autocast(x.device.type, enabled=False):
            return reference.run_dora_checked(x, packed, state, lora_A, lora_B, scaling,
                                              magnitude, bias, p, seed)
    problem = dora_fused_problem(state)
    if problem is not None:
        raise ValueError(f"dora_linear_4bit: the fused path cannot serve this weight: {problem}")
    check_fused_rank(lora_A)
    lead = x.shape[:-1]
    absmax, absmax2, code2, offset, code = _state_to_args(state)
    y = _dora_fwd(x.reshape(-1, x.shape[-1]), packed, absmax, absmax2, code2, offset, code,
                  magnitude, lora_A, lora_B, bias, float(scaling), p,
                  seed_tensor(seed, p, x.device), seed_high(seed), state.blocksize, state.quant_type,
                  state.shape[0])[0]
    return y.reshape(*lead, y.shape[-1])


def prepare_dora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             magnitude: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """dora_linear_4bit(x, packed, state, lora_A, lora_B, scaling, magnitude, bias) without
    dropout and without autograd, at generation sizes (M <= 16 rows), prepared once (issue
    29), as fastlora.prepare_lora_linear_4bit: a callable (x) -> y for inputs of x's shape,
    dtype and device, its result equal to dora_linear_4bit's bit for bit.

    The general path makes the weight norm || W + s B A ||_row at every call: a pass over the
    whole packed weight, as many bytes as the forward's own GEMM reads at these sizes. Here it
    is made once, with mns = magnitude / norm and (without a bias) the row-scaled weight and
    diag(mns) B the forward runs on; each call is then the plain layer's prepared launches
    (and, with a bias, dora_linear_4bit's combine y = mns * z + bias).

    None where dora_linear_4bit decides for itself (the reference backend or fp64, M = 0 or
    M > 16, a weight or rank the fused path cannot serve, no dispatcher pick yet, the
    dequantize path picked). The callable checks nothing when it runs: keep it only while the
    arguments, magnitude included, are the same tensors, unchanged (fastlora.modules does)."""
    from ..launch import dora
    from ..launch.forward import SMALL_M_MAX, prepare_small_m

    state = as_quant_state(state)
    check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, 0.0, False, None,
                 allowed_dtypes=ACTIVATION_DTYPES)
    check_magnitude(magnitude, x, state.shape[0])
    k, lead = x.shape[-1], x.shape[:-1]
    m = x.numel() // k if k else 0
    if not 0 < m <= SMALL_M_MAX or lora_A.shape[0] > MAX_FUSED_RANK \
            or dora_fused_problem(state) is not None or not use_kernels(x, state.quant_type):
        return None
    x2 = x.reshape(m, k)
    ws = dora.norm_partials(packed, state, lora_A, lora_B, scaling)
    if bias is None:  # as _forward's scaled path: the plain forward on diag(mns) W, diag(mns) B
        _, _, state_m, b_m, _ = dora.scales(state, lora_B, ws=ws, magnitude=magnitude,
                                            tiny=_TINY)
        run = prepare_small_m(x2, packed, state_m, lora_A, b_m, scaling, None)
    else:
        _, mns = dora.scales(state, lora_B, ws=ws, magnitude=magnitude, scale_weight=False,
                             scale_b=False)[:2]
        run = prepare_small_m(x2, packed, state, lora_A, lora_B, scaling, None)
    if run is None:
        return None
    n = state.shape[0]
    if bias is None:
        return lambda x_: run(x_.reshape(m, k)).reshape(*lead, n)
    return lambda x_: dora.combine(run(x_.reshape(m, k)), mns, bias=bias).reshape(*lead, n)
