"""`fastlora.mixed_linear_4bit`, the mixed-batch op family: several LoRA adapters over one 4-bit
base in one batch, each row (or sample) routed to one adapter, or to none.

    y[m] = x[m] @ deq(W)^T + s_g * dropout_g(x)[m] @ A_g^T @ B_g^T + bias,  g = row_adapter[m]

On the kernels the base GEMM runs once for the whole batch: the adapters' A and B are joined
along the rank inside the autograd graph (torch.cat, so each adapter's gradient comes back as
its slice), and the two custom ops run the plain layer's kernels with each row's U and dU kept
to its own adapter's columns (fastlora/launch/mixed.py):

    fastlora::mixed_fwd (x2, weight..., A_cat, B_cat, bias, row_seg, ranks, scalings, ps, seed)
        -> (y, U')
    fastlora::mixed_bwd (dy, x2, U', weight..., A_cat, B_cat, row_seg, ranks, scalings, ps,
                         seed, needs) -> (dx, dA_cat, dB_cat)

Adapters whose ranks sum past the fused rank (256), fp64 inputs and the reference backend run
fastlora.reference.mixed_linear_4bit (the first logged at WARNING).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..checks import (ACTIVATION_DTYPES, DeviceSeed, MixedAdapter, as_quant_state, check_mixed,
                      seed_high, seed_tensor)
from ..launch.selfcheck import use_kernels
from .linear import _autocast_inputs, _state_from_args, _state_to_args, over_rows

__all__ = ["mixed_linear_4bit", "prepare_mixed_linear_4bit", "MixedAdapter"]

logger = logging.getLogger("fastlora")
_logged: set = set()


def _segments(row_seg, ranks, scalings, ps):
    from ..launch.mixed import segments

    return segments(row_seg, ranks, scalings, ps)


@torch.library.custom_op("fastlora::mixed_fwd", mutates_args=())
def _mixed_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
               absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
               offset: Optional[torch.Tensor], code: torch.Tensor, lora_A: torch.Tensor,
               lora_B: torch.Tensor, bias: Optional[torch.Tensor], row_seg: torch.Tensor,
               ranks: list[int], scalings: list[float], ps: list[float], seed: torch.Tensor,
               seed_high: int, blocksize: int, quant_type: str, n_out: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..launch.mixed import mixed_forward

    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             n_out, x.shape[1], x.dtype)
    return mixed_forward(x, packed, state, lora_A, lora_B, bias,
                         _segments(row_seg, ranks, scalings, ps), DeviceSeed(seed, seed_high))


@_mixed_fwd.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, bias, row_seg, ranks,
      scalings, ps, seed, seed_high, blocksize, quant_type, n_out):
    return x.new_empty(x.shape[0], n_out), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::mixed_bwd", mutates_args=())
def _mixed_bwd(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, packed: torch.Tensor,
               absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
               code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
               code: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               row_seg: torch.Tensor, ranks: list[int], scalings: list[float], ps: list[float],
               seed: torch.Tensor, seed_high: int, blocksize: int, quant_type: str,
               need_dx: bool, need_dA: bool, need_dB: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..launch.mixed import mixed_backward

    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             lora_B.shape[0], x.shape[1], x.dtype)
    grads = mixed_backward(dy, x, u, packed, state, lora_A, lora_B,
                           _segments(row_seg, ranks, scalings, ps),
                           DeviceSeed(seed, seed_high), need_dx, need_dA, need_dB)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_mixed_bwd.register_fake
def _(dy, x, u, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, row_seg, ranks,
      scalings, ps, seed, seed_high, blocksize, quant_type, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_dA else x.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, bias, row_seg, ranks,
     scalings, ps, seed, seed_high, blocksize, quant_type, n_out) = inputs
    ctx.save_for_backward(x, output[1], packed, absmax, absmax2, code2, offset, code, lora_A,
                          lora_B, row_seg, seed)
    ctx.scalars = (list(ranks), list(scalings), list(ps), seed_high, blocksize, quant_type)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _du_unused):
    (x, u, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, row_seg,
     seed) = ctx.saved_tensors
    ranks, scalings, ps, seed_high, blocksize, quant_type = ctx.scalars
    needs = ctx.needs_input_grad
    need_dx, need_dA, need_dB, need_bias = needs[0], needs[7], needs[8], needs[9]
    dx = da = db = dbias = None
    if need_dx or need_dA or need_dB:
        dx, da, db = _mixed_bwd(dy.contiguous(), x, u, packed, absmax, absmax2, code2, offset,
                                code, lora_A, lora_B, row_seg, ranks, scalings, ps, seed,
                                seed_high, blocksize, quant_type, need_dx, need_dA, need_dB)
        dx = dx if need_dx else None
        da = da if need_dA else None
        db = db if need_dB else None
    if need_bias and ctx.has_bias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return (dx, None, None, None, None, None, None, da, db, dbias) + (None,) * 9


_mixed_fwd.register_autograd(_backward, setup_context=_setup_context)


def mixed_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state, adapters: Sequence,
                      row_adapter, bias: Optional[torch.Tensor] = None, training: bool = False,
                      seed: Optional[int] = None, *, _checked_rows: bool = False
                      ) -> torch.Tensor:
    """y = x @ deq(W)^T + bias, plus on each row its own adapter's s * dropout(x) @ A^T @ B^T.

    adapters: fastlora.MixedAdapter (lora_A [r_g, K], lora_B [N, r_g], scaling, dropout_p),
    ranks and scalings free per adapter; row_adapter: an integer tensor or sequence with one
    entry per row of x (x.shape[:-1] flattened) or per sample (x.shape[0]), each in
    [-1, len(adapters)), -1 giving the row no adapter (PEFT's "__base__"). Dropout applies to
    an adapter's rows when `training` and its dropout_p > 0, all from one mask over the batch
    (`seed`; drawn from torch's generator when None). Differentiable in x, every A and B, and
    bias; each adapter's gradients are those of its own rows. Dtypes and autocast as
    fastlora.lora_linear_4bit. The entries of a row_adapter tensor are checked on the host
    (one synchronisation on a GPU; fastlora.patch builds its routing from names it has
    checked and skips that, `_checked_rows`)."""
    state = as_quant_state(state)
    if isinstance(x, torch.Tensor) and isinstance(adapters, (list, tuple)):
        adapters = [_autocast_adapter(x, adapter) for adapter in adapters]
        if bias is None or isinstance(bias, torch.Tensor):  # else check_mixed says what is wrong
            x, _, _, bias = _autocast_inputs(x, x, x, bias)
    adapters, index, seed = check_mixed(x, packed, state, adapters, row_adapter, bias,
                                        training, seed, check_values=not _checked_rows)
    return run_mixed(x, packed, state, adapters, index, bias, seed)


def prepare_mixed_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state, adapters: Sequence,
                              row_adapter, bias: Optional[torch.Tensor] = None):
    """mixed_linear_4bit(x, packed, state, adapters, row_adapter, bias) without dropout and
    without autograd, at generation sizes (M <= 16 rows), made cheap on the host (issue 29, as
    fastlora.prepare_lora_linear_4bit): a callable (x) -> y for inputs of x's shape, dtype and
    device with this routing. The arguments and the routing's values are checked here, once;
    the adapters are joined along the rank and the routing tables built once, where
    mixed_linear_4bit concatenates every adapter's A and B at each call. Its result equals
    mixed_linear_4bit's bit for bit (the same launches on the same arguments).

    Dropout is off (mixed_linear_4bit with training=False). None where such calls take
    mixed_linear_4bit's own path: the reference backend (or fp64), M = 0 or M > 16, summed
    ranks past the fused rank, no dispatcher pick yet for this shape, the dequantize path
    picked. Not for torch.autocast or
    torch.compile (the caller checks). Keep the callable only while the arguments are the same
    tensors, unchanged (fastlora.modules does)."""
    from ..launch.mixed import mixed_problem, prepare_mixed_small_m

    state = as_quant_state(state)
    adapters, index, _ = check_mixed(x, packed, state, adapters, row_adapter, bias, False, None,
                                     allowed_dtypes=ACTIVATION_DTYPES)
    ranks = [a.lora_A.shape[0] for a in adapters]
    if x.numel() == 0 or mixed_problem(ranks) is not None \
            or not use_kernels(x, state.quant_type):
        return None
    lora_A = torch.cat([a.lora_A for a in adapters]).contiguous()
    lora_B = torch.cat([a.lora_B for a in adapters], dim=1).contiguous()
    seg = _segments(index.to(torch.int32), ranks, [a.scaling for a in adapters],
                    [0.0] * len(adapters))
    return over_rows(x, lora_B.shape[0], lambda x2: prepare_mixed_small_m(
        x2, packed, state, lora_A, lora_B, bias, seg))


def _autocast_adapter(x: torch.Tensor, adapter):
    """The adapter's A and B in the autocast dtype under torch.autocast (as x is cast)."""
    if not isinstance(adapter, (tuple, list)) or not 3 <= len(adapter) <= 4:
        return adapter  # check_mixed names what is wrong
    adapter = MixedAdapter(*adapter)
    if not all(isinstance(t, torch.Tensor) for t in (adapter.lora_A, adapter.lora_B)):
        return adapter
    _, lora_A, lora_B, _ = _autocast_inputs(x, adapter.lora_A, adapter.lora_B, None)
    return adapter._replace(lora_A=lora_A, lora_B=lora_B)


def run_mixed(x, packed, state, adapters, index, bias, seed):
    """mixed_linear_4bit on checked arguments: index int64 [rows] on x's device (entries in
    [-1, G)), adapters with their effective dropout p, seed an int or None."""
    from .. import reference
    from ..launch.mixed import mixed_problem

    ranks = [a.lora_A.shape[0] for a in adapters]
    problem = mixed_problem(ranks)
    if problem is not None and x.dtype != torch.float64 and use_kernels(x, state.quant_type) \
            and problem not in _logged:
        _logged.add(problem)
        logger.warning("fastlora: a mixed batch runs the PyTorch reference (unfused, slower): "
                       "%s; logged once", problem)
    if problem is not None or x.dtype == torch.float64 or x.numel() == 0 \
            or not use_kernels(x, state.quant_type):
        with torch.autocast(x.device.type, enabled=False):
            return reference.run_mixed_checked(x, packed, state, adapters, index, bias, seed)
    ps = [a.dropout_p for a in adapters]
    high, seed = seed_high(seed), seed_tensor(seed, max(ps), x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    lora_A = torch.cat([a.lora_A for a in adapters]) if len(adapters) > 1 \
        else adapters[0].lora_A
    lora_B = torch.cat([a.lora_B for a in adapters], dim=1) if len(adapters) > 1 \
        else adapters[0].lora_B
    absmax, absmax2, code2, offset, code = _state_to_args(state)
    y, _ = _mixed_fwd(x2, packed, absmax, absmax2, code2, offset, code, lora_A.contiguous(),
                      lora_B.contiguous(), bias, index.to(torch.int32), ranks,
                      [a.scaling for a in adapters], ps, seed, high, state.blocksize,
                      state.quant_type, state.shape[0])
    return y.reshape(*lead, y.shape[-1])
