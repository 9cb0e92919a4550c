"""The pure-PyTorch reference of the QLoRA layer (DESIGN.md, "The math").

    U  = dropout(x) @ A^T                   y  = x @ deq(W)^T + s * U @ B^T + bias
    dU = s * dy @ B      dB = s * dy^T @ U  dA = dU^T @ dropout(x)
    dx = dy @ deq(W) + dropout'(dU @ A)

`lora_linear_4bit` has the same signature as `fastlora.lora_linear_4bit` and an explicit
backward (the formulas above, not autograd through the forward), so it documents exactly what the
kernels compute. `dora_linear_4bit` is PEFT's DoRA layer over the same base and
`mixed_linear_4bit` a mixed batch (several adapters, one per row, PEFT's `adapter_names`),
both written as PEFT's forward and differentiated by autograd. All run in any float dtype,
float64 included: deq(W) is the float32 product `code * absmax` that bitsandbytes defines,
cast to x's dtype (exact in float64).

Dropout draws 16 bits per element of x from Philox4x32-10 (`tl.randint4x`), eight elements to
one call: element offset i = row * K + col takes half i % 2 of word (i % 8) // 2 of
randint4x(seed, i // 8) (`dropout_draws`), reproduced here bit for bit, so the mask is
regenerated from the seed in backward and never stored.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quant import QuantState, dequantize_4bit_torch

__all__ = ["lora_linear_4bit", "dora_linear_4bit", "mixed_linear_4bit", "dropout_mask", "dropout_threshold",
           "dropout_draws",
           "philox_randint", "philox_randint4x", "apply_dropout"]

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    """High 32 bits of a * b for 32-bit unsigned a (python int) and b (int64 tensor), computed
    in 16-bit limbs so no intermediate leaves int64's range."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    return (a_hi * b + ((a_lo * b) >> 16)) >> 16


def philox_randint4x(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> tuple:
    """`tl.randint4x(seed, offsets)` in PyTorch: four uint32 words per offset, each held in an
    int64 tensor.

    offsets: int64 tensor; the counter is (offset_lo, offset_hi, 0, 0), the key (seed_lo,
    seed_hi), as in triton.language.random.randint4x."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        new_c0 = (_umulhi32(_ROUND_B, c2) ^ c1 ^ k0) & _MASK32
        new_c2 = (_umulhi32(_ROUND_A, c0) ^ c3 ^ k1) & _MASK32
        c1 = (_ROUND_B * c2) & _MASK32
        c3 = (_ROUND_A * c0) & _MASK32
        c0, c2 = new_c0, new_c2
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """`tl.randint(seed, offsets)`: the first word of philox_randint4x."""
    return philox_randint4x(seed, offsets, n_rounds)[0]


DRAW_BITS = 16      # bits of Philox output per dropout element
DRAWS_PER_CALL = 8  # 4 words x 2 halves: one randint4x call serves 8 neighbouring elements


def dropout_threshold(p: float) -> int:
    """An element is kept when its 16-bit draw is >= this: P(keep) = 1 - t / 2^16, within
    2^-17 of 1 - p (p rounded to the nearest 1/65536)."""
    return min(int(p * 2.0**DRAW_BITS + 0.5), 2**DRAW_BITS)


def dropout_draws(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The 16-bit dropout draw of each element offset (int64 tensor; values 0..65535): half
    offset % 2 (low 16 bits first) of word (offset % 8) // 2 of randint4x(seed, offset // 8).
    One Philox call per distinct offset // 8, as in the kernels (common.dropout_keep)."""
    offsets = offsets.to(torch.int64)
    calls, which = torch.unique(offsets // DRAWS_PER_CALL, return_inverse=True)
    words = torch.stack(philox_randint4x(seed, calls))  # [4, calls]
    j = offsets % DRAWS_PER_CALL
    word = words[j // 2, which]
    return (word >> (DRAW_BITS * (j % 2))) & (2**DRAW_BITS - 1)


def dropout_mask(seed: int, rows: int, cols: int, p: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [rows, cols] keep-mask of element (m, k), drawn at offset m * cols + k."""
    offsets = torch.arange(rows * cols, device=device, dtype=torch.int64)
    return (dropout_draws(seed, offsets) >= dropout_threshold(p)).view(rows, cols)


def apply_dropout(t: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout(t) for 2-D t: kept values scaled by 1/(1-p), computed in t's precision
    (float32 for half types), rounded once to t's dtype."""
    if p == 0.0:
        return t
    keep = dropout_mask(seed, t.shape[0], t.shape[1], p, t.device)
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(wide) * keep * (1.0 / (1.0 - p))).to(t.dtype)


class _ReferenceLoRA4bit(torch.autograd.Function):
    """Forward and the explicit backward of DESIGN.md on 2-D x [M, K]."""

    @staticmethod
    def forward(ctx, x, packed, state, lora_A, lora_B, scaling, bias, p, seed):
        weight = dequantize_4bit_torch(packed, state, x.dtype)
        u = apply_dropout(x, seed, p) @ lora_A.t()
        y = x @ weight.t() + (u @ lora_B.t()) * scaling
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, u, lora_A, lora_B)
        ctx.packed, ctx.state, ctx.scaling, ctx.p, ctx.seed = packed, state, scaling, p, seed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_A, lora_B = ctx.saved_tensors
        dy = dy.to(x.dtype)
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        need_x, _, _, need_A, need_B, _, need_bias, _, _ = ctx.needs_input_grad
        dx = dA = dB = dbias = None
        du = (dy @ lora_B) * s if (need_x or need_A) else None
        if need_B:
            dB = ((dy.t() @ u) * s).to(lora_B.dtype)
        if need_A:
            dA = (du.t() @ apply_dropout(x, seed, p)).to(lora_A.dtype)
        if need_x:
            weight = dequantize_4bit_torch(ctx.packed, ctx.state, x.dtype)
            dx = dy @ weight + apply_dropout(du @ lora_A, seed, p)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, None, None, dA, dB, None, dbias, None, None


def lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     training: bool = False, seed: Optional[int] = None) -> torch.Tensor:
    """Reference QLoRA layer: `x @ deq(W)^T + scaling * dropout(x) @ A^T @ B^T + bias`.

    x [..., K]; packed/state the bnb 4-bit weight [N, K]; lora_A [r, K]; lora_B [N, r];
    bias [N] or None. Dropout applies only when `training` and dropout_p > 0; `seed` selects
    the mask (drawn from torch's generator when None). Differentiable w.r.t. x, A, B, bias.
    """
    from .checks import as_quant_state, check_inputs

    state = as_quant_state(state)
    p, seed = check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, dropout_p,
                           training, seed)
    return run_checked(x, packed, state, lora_A, lora_B, scaling, bias, p, seed)


def run_checked(x, packed, state, lora_A, lora_B, scaling, bias, p, seed):
    """lora_linear_4bit on arguments fastlora.checks.check_inputs has already validated (p: the
    effective dropout; seed None: drawn from torch's generator)."""
    from .checks import resolve_seed

    lead = x.shape[:-1]
    y = _ReferenceLoRA4bit.apply(x.reshape(-1, x.shape[-1]), packed, state, lora_A, lora_B,
                                 float(scaling), bias, p, resolve_seed(seed, p, x.device))
    return y.reshape(*lead, y.shape[-1])


# ----------------------------------------------------------------------------- DoRA

def dora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     magnitude: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, training: bool = False,
                     seed: Optional[int] = None) -> torch.Tensor:
    """Reference DoRA layer over a 4-bit base, PEFT's semantics (peft/tuners/lora/dora.py and
    variants.py, DoraLinearVariant, as bnb.Linear4bit runs it):

        norm = || deq(W) + s * B @ A ||_row, detached (DoRA paper, section 4.3)
        mns  = magnitude / norm
        y    = x @ W^T + bias + (mns - 1) * base_d + mns * s * dropout(x) @ A^T @ B^T

    where base_d = x @ W^T without dropout (p = 0 or not training: y = mns * (x @ W^T +
    s * x @ A^T @ B^T) + bias) and dropout(x) @ W^T with it. Written as that forward and
    differentiated by autograd (an independent check of fastlora/ops/dora.py's explicit
    backward). Arguments as lora_linear_4bit, plus magnitude [N] (any float dtype; the norm
    and mns are computed in float32, float64 for float64 x)."""
    from .checks import as_quant_state, check_inputs, check_magnitude

    state = as_quant_state(state)
    p, seed = check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, dropout_p,
                           training, seed)
    check_magnitude(magnitude, x, state.shape[0])
    return run_dora_checked(x, packed, state, lora_A, lora_B, scaling, magnitude, bias, p, seed)


def run_dora_checked(x, packed, state, lora_A, lora_B, scaling, magnitude, bias, p, seed):
    """dora_linear_4bit on checked arguments (p: the effective dropout; seed None: drawn)."""
    from .checks import resolve_seed

    seed = resolve_seed(seed, p, x.device)
    x2 = x.reshape(-1, x.shape[-1])
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = dequantize_4bit_torch(packed, state, x.dtype)
    with torch.no_grad():
        norm = (dequantize_4bit_torch(packed, state, wide)
                + scaling * (lora_B.to(wide) @ lora_A.to(wide))).norm(dim=1)
    mns = magnitude.to(wide) / norm
    base = x2 @ weight.t()
    xd = apply_dropout(x2, seed, p)
    base_d = base if p == 0.0 else xd @ weight.t()
    lora = (xd @ lora_A.t()) @ lora_B.t()
    y = base.to(wide) + (mns - 1) * base_d.to(wide) + mns * lora.to(wide) * scaling
    if bias is not None:
        y = y + bias.to(wide)
    y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------- mixed batches

def mixed_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, adapters,
                      row_adapter, bias: Optional[torch.Tensor] = None, training: bool = False,
                      seed: Optional[int] = None) -> torch.Tensor:
    """Reference mixed batch: several LoRA adapters over one 4-bit base, each row of x (or
    each sample, x.shape[0]) routed to one adapter by row_adapter (-1: the base alone):

        y[m] = x[m] @ deq(W)^T + s_g * dropout_g(x)[m] @ A_g^T @ B_g^T + bias,  g = row_adapter[m]

    PEFT's mixed-batch forward (lora/layer.py _mixed_batch_forward), adapter by adapter on its
    own rows, differentiated by autograd. adapters: fastlora.MixedAdapter (lora_A, lora_B,
    scaling, dropout_p); dropout draws one mask over the whole batch (element (m, k) at offset
    m * K + k, as a single layer's), each row kept with its own adapter's threshold."""
    from .checks import as_quant_state, check_mixed

    state = as_quant_state(state)
    adapters, index, seed = check_mixed(x, packed, state, adapters, row_adapter, bias,
                                        training, seed)
    return run_mixed_checked(x, packed, state, adapters, index, bias, seed)


def run_mixed_checked(x, packed, state, adapters, index, bias, seed):
    """mixed_linear_4bit on checked arguments (index: int64 [rows]; seed None: drawn)."""
    from .checks import resolve_seed

    ps = [adapter.dropout_p for adapter in adapters]
    seed = resolve_seed(seed, max(ps), x.device)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    y = x2 @ dequantize_4bit_torch(packed, state, x.dtype).t()
    draws = None
    if max(ps) > 0.0:
        offsets = torch.arange(x2.numel(), device=x.device, dtype=torch.int64)
        draws = dropout_draws(seed, offsets).view(x2.shape)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    for g, adapter in enumerate(adapters):
        rows = (index == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xs = x2[rows]
        if adapter.dropout_p > 0.0:
            keep = draws[rows] >= dropout_threshold(adapter.dropout_p)
            xs = (xs.to(wide) * keep * (1.0 / (1.0 - adapter.dropout_p))).to(x.dtype)
        lora = (xs @ adapter.lora_A.t()) @ adapter.lora_B.t() * adapter.scaling
        y = y.index_add(0, rows, lora)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])
