"""`fastlora.lora_linear_4bit`, the single-layer op family: backend choice and the fused op
(its argument checks live in fastlora.checks).

The fused path is two torch.library custom ops, so torch.compile sees them as opaque nodes
(fullgraph works, also while the kernels run in the interpreter):

    fastlora::lora_fwd (x2, weight..., A, B, bias, s, p, seed, seed_high) -> (y, U)
    fastlora::lora_bwd (dy, x2, U, weight..., A, B, s, p, seed, seed_high, needs) -> (dx, dA, dB)

(seed: an int64 [1] tensor on x's device, read by the kernels there; seed_high: its high word,
a host int: fastlora.checks.DeviceSeed)

joined by `register_autograd`, which saves x, U, A, B and the packed weight (never a dequantized
weight, never a dropout mask: the mask is regenerated from the seed). The launchers behind them
live in fastlora/launch (forward.py, backward.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import (ACTIVATION_DTYPES, MAX_FUSED_RANK, as_quant_state, check_inputs,
                      DeviceSeed, seed_high, seed_tensor)
from ..launch.selfcheck import use_kernels
from ..quant import QuantState

__all__ = ["lora_linear_4bit", "prepare_lora_linear_4bit"]


# ----------------------------------------------------------------------------- custom ops

def _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type, n_out, k_in,
                     dtype) -> QuantState:
    state2 = None
    if absmax2 is not None:
        state2 = QuantState(absmax=absmax2, code=code2, blocksize=256, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=(n_out, k_in), code=code, blocksize=blocksize,
                      quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)


def _state_to_args(state: QuantState) -> tuple:
    if state.nested:
        return (state.absmax, state.state2.absmax, state.state2.code,
                state.offset.reshape(1).float(), state.code)
    return (state.absmax, None, None, None, state.code)


@torch.library.custom_op("fastlora::lora_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
              absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], code: torch.Tensor, lora_A: torch.Tensor,
              lora_B: torch.Tensor, bias: Optional[torch.Tensor], scaling: float, p: float,
              seed: torch.Tensor, seed_high: int, blocksize: int, quant_type: str, n_out: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..launch.forward import lora_forward

    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             n_out, x.shape[1], x.dtype)
    # lora_linear_4bit checked every argument (fastlora.checks.check_inputs) before this op
    return lora_forward(x, packed, state, lora_A, lora_B, scaling, bias, p,
                        DeviceSeed(seed, seed_high), check=False)


@_lora_fwd.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, bias, scaling, p, seed,
      seed_high, blocksize, quant_type, n_out):
    return x.new_empty(x.shape[0], n_out), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::lora_bwd", mutates_args=())
def _lora_bwd(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, packed: torch.Tensor,
              absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
              code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
              code: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              p: float, seed: torch.Tensor, seed_high: int, blocksize: int, quant_type: str,
              need_dx: bool,
              need_dA: bool, need_dB: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..launch.backward import lora_backward

    state = _state_from_args(absmax, absmax2, code2, offset, code, blocksize, quant_type,
                             lora_B.shape[0], x.shape[1], x.dtype)
    dx, da, db = lora_backward(dy, x, u, packed, state, lora_A, lora_B, scaling, p,
                               DeviceSeed(seed, seed_high), need_dx, need_dA, need_dB)
    # custom ops cannot return None: an empty tensor stands for "none" (a fresh one each:
    # outputs may not alias one another)
    return tuple(g if g is not None else x.new_empty(0) for g in (dx, da, db))


@_lora_bwd.register_fake
def _(dy, x, u, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, scaling, p, seed,
      seed_high, blocksize, quant_type, need_dx, need_dA, need_dB):
    # contiguous, as the launcher allocates them (empty_like would copy a view's strides)
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_dA else x.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, bias, scaling, p, seed,
     seed_high, blocksize, quant_type, n_out) = inputs
    _, u = output
    ctx.save_for_backward(x, u, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B,
                          seed)
    ctx.scalars = (scaling, p, seed_high, blocksize, quant_type)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _du_unused):
    x, u, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, seed = ctx.saved_tensors
    scaling, p, seed_high, blocksize, quant_type = ctx.scalars
    needs = ctx.needs_input_grad
    need_dx, need_dA, need_dB, need_bias = needs[0], needs[7], needs[8], needs[9]
    dx = da = db = dbias = None
    if need_dx or need_dA or need_dB:
        dx, da, db = _lora_bwd(dy.contiguous(), x, u, packed, absmax, absmax2, code2, offset,
                               code, lora_A, lora_B, scaling, p, seed, seed_high, blocksize,
                               quant_type, need_dx, need_dA, need_dB)
        dx = dx if need_dx else None
        da = da if need_dA else None
        db = db if need_dB else None
    if need_bias and ctx.has_bias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return (dx, None, None, None, None, None, None, da, db, dbias, None, None, None, None, None,
            None, None)


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op

def _autocast_inputs(x, lora_A, lora_B, bias):
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, lora_A, lora_B, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = (lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t)
    return cast(x), cast(lora_A), cast(lora_B), cast(bias)


def lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     training: bool = False, seed: Optional[int] = None) -> torch.Tensor:
    """y = x @ deq(W)^T + scaling * dropout(x) @ lora_A^T @ lora_B^T + bias, differentiable.

    x [..., K] fp16/bf16/fp32 (fp64 runs the reference); packed/state: the bitsandbytes 4-bit
    weight [N, K] (a bnb QuantState is accepted and wrapped without copying); lora_A [r, K];
    lora_B [N, r]; bias [N] or None, all in x's dtype (under torch.autocast they are cast to the
    autocast dtype, gradients flowing back in the parameters' own dtypes). Dropout (on the LoRA
    input only) applies when `training` and dropout_p > 0; the mask is a function of `seed`
    (drawn from torch's generator when None) and never stored.

    Runs the fused Triton kernels or the PyTorch reference, as FASTLORA_BACKEND says
    (fastlora.backend).
    """
    x, lora_A, lora_B, bias = _autocast_inputs(x, lora_A, lora_B, bias)
    state = as_quant_state(state)
    p, seed = check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, dropout_p, training,
                           seed)
    if x.dtype == torch.float64 or x.numel() == 0 or not use_kernels(x, state.quant_type):
        from .. import reference

        with torch.autocast(x.device.type, enabled=False):
            return reference.run_checked(x, packed, state, lora_A, lora_B, scaling, bias, p,
                                         seed)
    high, seed = seed_high(seed), seed_tensor(seed, p, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    absmax, absmax2, code2, offset, code = _state_to_args(state)
    y, _ = _lora_fwd(x2, packed, absmax, absmax2, code2, offset, code, lora_A, lora_B, bias,
                     float(scaling), p, seed, high, state.blocksize, state.quant_type,
                     state.shape[0])
    return y.reshape(*lead, y.shape[-1])



def prepare_lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             bias: Optional[torch.Tensor] = None):
    """lora_linear_4bit(x, packed, state, lora_A, lora_B, scaling, bias) without dropout and
    without autograd, at generation sizes (M <= 16 rows), made cheap on the host (issue 29): a
    callable (x) -> y for inputs of x's shape, dtype and device, with the arguments checked
    and every decision (backend, decode self-check, the dispatcher's pick, the kernel
    configuration, the launch arguments) taken here, once. Its result equals
    lora_linear_4bit's bit for bit (the same two launches on the same arguments).

    None where such calls take lora_linear_4bit's own path: the reference backend (or fp64),
    M = 0 or M > 16, a rank past the kernels', no dispatcher pick yet for this shape, the
    dequantize path picked. Not for torch.autocast or torch.compile (the caller checks).

    The callable checks nothing when it runs: keep it only while the arguments are the same
    tensors, unchanged (same version and storage), and FASTLORA_BACKEND and
    fastlora.launch.dispatch.settings() read what they read here (fastlora.modules does)."""
    from ..launch.forward import prepare_small_m

    state = as_quant_state(state)
    check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, 0.0, False, None,
                 allowed_dtypes=ACTIVATION_DTYPES)
    if x.numel() == 0 or lora_A.shape[0] > MAX_FUSED_RANK \
            or not use_kernels(x, state.quant_type):
        return None
    return over_rows(x, lora_B.shape[0], lambda x2: prepare_small_m(
        x2, packed, state, lora_A, lora_B, scaling, bias))


def over_rows(x: torch.Tensor, n: int, prepare):
    """A prepared call (x) -> y [..., n] for inputs shaped like x [..., K], from `prepare`
    (x2 [M, K]) -> a prepared call on x's rows or None (then None)."""
    k, lead = x.shape[-1], x.shape[:-1]
    run = prepare(x.reshape(-1, k))
    if run is None:
        return None
    return lambda x_: run(x_.reshape(-1, k)).reshape(*lead, n)
