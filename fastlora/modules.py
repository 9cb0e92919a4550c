"""`fastlora.LoRALinear4bit`: a frozen bitsandbytes 4-bit linear layer with one LoRA adapter,
run by the fused op (`fastlora.lora_linear_4bit`).

    y = x @ deq(W)^T + scaling * dropout(x) @ lora_A.weight^T @ lora_B.weight^T + bias

It mirrors PEFT's `lora.Linear4bit` for one adapter: the base is a `bitsandbytes.nn.Linear4bit`
(`base_layer`), the adapter two bias-free `nn.Linear` (`lora_A` [r, in], `lora_B` [out, r],
float32 like PEFT's, A kaiming-uniform with a=sqrt(5), B zeros), so the state-dict keys are
PEFT's: `base_layer.weight` with bitsandbytes' quant-state entries, and `lora_A.weight`,
`lora_B.weight`, the keys of a PEFT adapter file (PEFT drops the adapter name when saving).

`fused_lora_forward` is the one place where a bnb base layer and an adapter become a call of
the fused op; `fastlora.patch` sends PEFT's layers through it too.
"""

from __future__ import annotations

import functools
import math
import numbers
import weakref
from typing import Optional

import torch
from torch import nn

from .checks import ACTIVATION_DTYPES, MixedAdapter
from . import backend
from .launch import dispatch
from .launch.common import dot_precision
from .ops import (dora_linear_4bit, lora_group_4bit, lora_linear_4bit, prepare_dora_linear_4bit,
                  prepare_lora_group_4bit, prepare_lora_linear_4bit, prepare_mixed_linear_4bit)
from .quant import QuantState, quantize_4bit

__all__ = ["LoRALinear4bit", "fused_lora_forward", "fused_dora_forward", "fused_group_forward",
           "fused_mixed_forward", "bnb_quant_state"]


def bnb_quant_state(base_layer: nn.Module):
    """The bitsandbytes QuantState of a bnb Linear4bit, found where bitsandbytes itself looks:
    on the weight, else on the module (FSDP's flat parameters lose the weight's attribute)."""
    state = getattr(base_layer.weight, "quant_state", None)
    return state if state is not None else getattr(base_layer, "quant_state", None)


def _member(x: torch.Tensor, base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear,
            scaling: float, dropout: nn.Module) -> tuple:
    """(compute dtype, GroupMember) of a bnb base layer and an adapter for input x: the op's
    arguments, adapter weights and bias cast to the compute dtype (the base layer's, x's when
    it has none) inside the autograd graph, the dropout's p when it is training (else 0)."""
    from .checks import GroupMember

    dtype = x.dtype if base_layer.compute_dtype is None else base_layer.compute_dtype
    bias = base_layer.bias.to(dtype) if base_layer.bias is not None else None
    if lora_B.bias is not None:
        lora_bias = lora_B.bias.to(dtype) * scaling
        bias = lora_bias if bias is None else bias + lora_bias
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return dtype, GroupMember(base_layer.weight.data, bnb_quant_state(base_layer),
                              lora_A.weight.to(dtype), lora_B.weight.to(dtype), scaling, bias, p)


def fused_lora_forward(x: torch.Tensor, base_layer: nn.Module, lora_A: nn.Linear,
                       lora_B: nn.Linear, scaling: float, dropout: nn.Module) -> torch.Tensor:
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))) in one fused op.

    Computes in the base layer's compute_dtype (x's dtype when it has none), as bitsandbytes
    does, and returns x's dtype. The adapter's weights (float32 in PEFT) and the frozen bias
    are cast to the compute dtype inside the autograd graph, so their gradients come back in
    their own dtype. A bias on lora_B (PEFT's lora_bias) joins the frozen bias, times scaling.
    `dropout` is nn.Dropout or nn.Identity; its p and .training are read at every call."""
    y = _prepared(x, [(base_layer, lora_A, lora_B, scaling, dropout)])
    if y is not None:
        return y
    dtype, mb = _member(x, base_layer, lora_A, lora_B, scaling, dropout)
    y = lora_linear_4bit(x.to(dtype), mb.packed, mb.state, mb.lora_A, mb.lora_B, scaling,
                         mb.bias, dropout_p=mb.dropout_p, training=True)
    return y.to(x.dtype)


# Prepared calls (issue 29, host time): lora_A module -> {key: (stamp, callable or None)}.
# Weak keys: a layer that goes away takes its entries with it; nothing here is pickled.
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Optimizer steps taken, by any torch.optim.Optimizer (a global post-step hook, registered at
# the first prepared call). A parameter's version counter does not see every write:
# bitsandbytes' 8-bit and paged optimizers (QLoRA's usual paged_adamw_8bit) update it in their
# own kernel, leaving _version as it was. A prepared call holds the adapter cast to the
# compute dtype (and a DoRA layer its weight norm), so every step makes them all again.
_STEPS = [0]
_STEP_HOOK: list = []


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


def _optimizer_steps() -> int:
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))
    return _STEPS[0]


def _tensor_stamp(t: Optional[torch.Tensor]):
    """What changes when a tensor is replaced, written in place or given new storage."""
    return None if t is None else (id(t), t._version, t.data_ptr())


def _layer_stamp(base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, scaling
                 ) -> Optional[tuple]:
    """What a prepared call of this layer depends on, read cheaply (None: not a plain layer).
    The parameters come from the modules' dicts (nn.Module.__getattr__ costs ~0.5 us a read),
    and past bitsandbytes' Params4bit.__torch_function__ (~1.4 us a tensor attribute)."""
    base, a, b = base_layer._parameters, lora_A._parameters, lora_B._parameters
    weight = base.get("weight")
    if weight is None or "weight" not in a or "weight" not in b:
        return None
    state = getattr(weight, "quant_state", None)  # bnb_quant_state, from the weight read here
    if state is None:
        state = getattr(base_layer, "quant_state", None)
    with torch._C.DisableTorchFunctionSubclass():
        return (scaling, _tensor_stamp(weight), id(state), _tensor_stamp(a["weight"]),
                _tensor_stamp(b["weight"]), _tensor_stamp(base.get("bias")),
                _tensor_stamp(b.get("bias")), base_layer.compute_dtype)


def _prepared(x: torch.Tensor, layers: list, magnitude: Optional[torch.Tensor] = None,
              slots: Optional[tuple] = None):
    """The output of fused_lora_forward (one layer), fused_dora_forward (one layer and its
    `magnitude`), fused_group_forward (several; a list) or fused_mixed_forward (one base
    layer's adapters, one per slot, and the samples' `slots`) through a prepared call
    (fastlora.prepare_lora_linear_4bit / prepare_dora_linear_4bit / prepare_lora_group_4bit /
    prepare_mixed_linear_4bit) where one applies: no autograd (torch.no_grad /
    inference_mode: generation, evaluation), no active dropout, M <= 16 rows, one compute
    dtype, not under torch.compile or torch.autocast. layers: (base_layer, lora_A, lora_B,
    scaling, dropout) each. The cast adapter weights and the launch arguments are kept per
    (first) layer and (device, dtype, input shape, the layers, the slots) and rebuilt, every
    check with them, when a weight, bias, quant state, scaling, DoRA magnitude or compute
    dtype changes (replaced, written in place, new storage), an optimizer steps (_STEPS: not
    every optimizer's write shows in a version counter), or FASTLORA_BACKEND or the
    dispatcher's settings do. Not seen: a write through `param.data` (a tensor with a version
    counter of its own) outside an optimizer step. None: the call takes the general path."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dim() < 1 \
            or x.device.type not in ("cuda", "cpu") or torch.is_autocast_enabled(x.device.type):
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not 0 < m <= dispatch.SMALL_M_MAX:  # the prepared path's limit
        return None
    stamp = []
    for base_layer, lora_A, lora_B, scaling, dropout in layers:
        if dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None
        layer_stamp = _layer_stamp(base_layer, lora_A, lora_B, scaling)
        if layer_stamp is None:
            return None
        stamp.append(layer_stamp)
    dtypes = {layer_stamp[-1] or x.dtype for layer_stamp in stamp}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if magnitude is not None:
        stamp.append(_tensor_stamp(magnitude))
    stamp.append(_optimizer_steps())
    key = (x.device, dtype, tuple(x.shape), tuple(id(layer[1]) for layer in layers[1:]),
           magnitude is not None, slots, backend.requested(), dispatch.settings(),
           dot_precision(dtype))
    first = layers[0][1]
    plans = _PREPARED.get(first)
    if plans is None:
        plans = _PREPARED[first] = {}
    entry = plans.get(key)
    if entry is None or entry[0] != stamp:
        if len(plans) >= 64 or any(old != stamp for old, _ in plans.values()):
            plans.clear()
        members = [_member(x, *layer)[1] for layer in layers]
        xc = x.to(dtype)
        if magnitude is not None:
            call = prepare_dora_linear_4bit(xc, *members[0][:5], magnitude, members[0].bias)
        elif slots is not None:
            call = prepare_mixed_linear_4bit(
                xc, members[0].packed, members[0].state,
                [MixedAdapter(mb.lora_A, mb.lora_B, mb.scaling) for mb in members],
                _routing(slots, x.device), members[0].bias)
        elif len(layers) == 1:
            call = prepare_lora_linear_4bit(xc, *members[0][:6])
        else:
            call = prepare_lora_group_4bit(xc, members)
        entry = plans[key] = (stamp, call)
    call = entry[1]
    if call is None:
        return None
    ys = call(x.to(dtype))
    if len(layers) == 1 or slots is not None:
        return ys.to(x.dtype)
    return [y.to(x.dtype) for y in ys]


def fused_dora_forward(x: torch.Tensor, base_layer: nn.Module, lora_A: nn.Linear,
                       lora_B: nn.Linear, scaling: float, dropout: nn.Module,
                       magnitude: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA layer (base_layer, adapter, magnitude [N]: lora_magnitude_vector's weight)
    in one fused op, fastlora.dora_linear_4bit; dtypes and dropout as fused_lora_forward (the
    magnitude stays in its own dtype). PEFT forbids lora_bias with DoRA: lora_B has no bias."""
    if lora_B.bias is not None:
        raise ValueError("DoRA with a bias on lora_B (lora_bias=True) is not defined (PEFT "
                         "refuses that config)")
    y = _prepared(x, [(base_layer, lora_A, lora_B, scaling, dropout)], magnitude)
    if y is not None:
        return y
    dtype, mb = _member(x, base_layer, lora_A, lora_B, scaling, dropout)
    y = dora_linear_4bit(x.to(dtype), mb.packed, mb.state, mb.lora_A, mb.lora_B, scaling,
                         magnitude, mb.bias, dropout_p=mb.dropout_p, training=True)
    return y.to(x.dtype)


def fused_group_forward(x: torch.Tensor, layers) -> Optional[list]:
    """[fused_lora_forward(x, *layer) for layer in layers] as one fused group op
    (fastlora.lora_group_4bit; layers: (base_layer, lora_A, lora_B, scaling, dropout) each),
    or None when their compute dtypes differ (they then run one by one)."""
    ys = _prepared(x, layers)
    if ys is not None:
        return ys
    members = [_member(x, *layer) for layer in layers]
    dtypes = {dtype for dtype, _ in members}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    ys = lora_group_4bit(x.to(dtype), [mb for _, mb in members], training=True)
    return [y.to(x.dtype) for y in ys]


def fused_mixed_forward(x: torch.Tensor, base_layer: nn.Module, adapters, slots: tuple
                        ) -> torch.Tensor:
    """A mixed batch over one bnb base layer in one fused op (fastlora.mixed_linear_4bit):
    adapters holds (lora_A, lora_B, scaling, dropout) per slot, slots one slot index per
    sample of x (x.shape[0]; -1: the base alone). Dtypes and dropout as fused_lora_forward;
    the adapters' lora_B carry no bias (the caller checks). The routing tensor is built once
    per slots and device (cached), so a call makes no host-to-device copy; a no-grad call of
    M <= 16 rows takes a prepared call (_prepared: the adapters joined and cast once)."""
    from .ops.mixed import mixed_linear_4bit

    y = _prepared(x, [(base_layer, *adapter) for adapter in adapters], slots=slots)
    if y is not None:
        return y
    dtype = x.dtype if base_layer.compute_dtype is None else base_layer.compute_dtype
    bias = base_layer.bias.to(dtype) if base_layer.bias is not None else None
    mixed = [MixedAdapter(lora_A.weight.to(dtype), lora_B.weight.to(dtype), scaling,
                          dropout.p if isinstance(dropout, nn.Dropout) and dropout.training
                          else 0.0)
             for lora_A, lora_B, scaling, dropout in adapters]
    y = mixed_linear_4bit(x.to(dtype), base_layer.weight.data, bnb_quant_state(base_layer),
                          mixed, _routing(slots, x.device), bias, training=True,
                          _checked_rows=True)
    return y.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _routing(slots: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64).to(device)


def _bnb_linear4bit(packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor],
                    compute_dtype: Optional[torch.dtype], quant_storage: torch.dtype):
    """A bitsandbytes Linear4bit holding `packed` and `state` as they are (no copy, no
    re-quantisation); built on the meta device so no dense weight is ever allocated."""
    import bitsandbytes as bnb

    n_out, k_in = state.shape
    layer = bnb.nn.Linear4bit(k_in, n_out, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=state.nested, quant_type=state.quant_type,
                              quant_storage=quant_storage, device="meta")
    bnb_state = state.to_bnb()
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=bnb_state,
                                     blocksize=state.blocksize,
                                     compress_statistics=state.nested,
                                     quant_type=state.quant_type, quant_storage=quant_storage,
                                     module=layer, bnb_quantized=True)
    layer.quant_state = bnb_state
    layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    return layer


def _check_lora_args(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) \
            or not math.isfinite(float(lora_alpha)):
        raise TypeError(f"lora_alpha must be a finite real number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
            or not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")


class LoRALinear4bit(nn.Module):
    """A frozen bitsandbytes 4-bit linear layer plus a trainable LoRA adapter, fused.

    Build it with `from_linear` (quantises a dense nn.Linear with fastlora.quantize_4bit,
    bit-identical to bitsandbytes) or `from_bnb` (adopts an existing, quantised
    bitsandbytes.nn.Linear4bit: its packed weight and quant state are used in place).
    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (as PEFT)."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        import bitsandbytes as bnb

        if not isinstance(base_layer, bnb.nn.Linear4bit):
            raise TypeError(f"base_layer must be a bitsandbytes.nn.Linear4bit, got "
                            f"{type(base_layer).__name__}")
        state = bnb_quant_state(base_layer)
        if state is None:
            raise ValueError("base_layer has no quant_state: quantise it first (bitsandbytes "
                             "quantises a Linear4bit when it is moved to its device)")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("base_layer's weight was repacked by bitsandbytes for its CPU "
                             "inference kernel; fastlora reads the standard 4-bit layout only")
        QuantState.from_bnb(state).validate(base_layer.weight.data, name="base_layer quant_state")
        if tuple(state.shape) != (base_layer.out_features, base_layer.in_features):
            raise ValueError(f"base_layer quant_state.shape is {tuple(state.shape)} but the layer "
                             f"is {base_layer.out_features}x{base_layer.in_features}")
        _check_lora_args(r, lora_alpha, lora_dropout)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = int(r), float(lora_alpha), bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    bias: bool = True, use_rslora: bool = False, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8,
                    compute_dtype: Optional[torch.dtype] = None) -> "LoRALinear4bit":
        """Quantise `linear`'s weight to 4 bits (its dtype is the quant state's dtype) and add a
        LoRA adapter. bias=True keeps linear's bias (frozen, copied) when it has one.
        compute_dtype None: compute in the input's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if compute_dtype is not None and compute_dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"compute_dtype must be None or one of {ACTIVATION_DTYPES}, "
                            f"got {compute_dtype}")
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize,
                                      double_quant, quant_storage)
        keep_bias = linear.bias.detach().clone() if bias and linear.bias is not None else None
        base = _bnb_linear4bit(packed, state, keep_bias, compute_dtype, quant_storage)
        return cls(base, r, lora_alpha, lora_dropout, use_rslora)

    @classmethod
    def from_bnb(cls, bnb_linear: nn.Module, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear4bit":
        """Adopt a quantised bitsandbytes.nn.Linear4bit as the frozen base (the same module
        object: its packed weight, quant state and bias are shared, not copied) and add a LoRA
        adapter. The layer's parameters are set to requires_grad=False."""
        return cls(bnb_linear, r, lora_alpha, lora_dropout, use_rslora)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform (a=sqrt(5)), B zeros, so the layer starts
        equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_lora_forward(x, self.base_layer, self.lora_A, self.lora_B, self.scaling,
                                  self.lora_dropout)

    def extra_repr(self) -> str:
        state = bnb_quant_state(self.base_layer)
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, quant_type={state.quant_type}")
