"""The QLoRA layer implementations the suite compares, each built from one LoraCase (the same
bitsandbytes-quantised weight, LoRA tensors, bias and scaling for every provider).

    fastlora    fastlora.lora_linear_4bit: the fused Triton kernels (FASTLORA_BACKEND decides),
                the base product's path picked per shape by the dispatcher (timed on the GPU)
    fastlora_fused    the same with the base product forced onto the fused GEMMs
    fastlora_dequant  the same forced onto fastlora's dequantize kernel + cuBLAS
                (fastlora/launch/dispatch.py; `Built.base_path` is entered around each run)
    peft_bnb    PEFT's LoRA Linear4bit around a bitsandbytes Linear4bit: the unfused path
                QLoRA users run today
    dequant_mm  the scheme of today's fastest QLoRA stacks, from public bitsandbytes and torch
                calls: dequantize W into a reused buffer, cuBLAS x W^T, addmm the LoRA term;
                its own autograd Function dequantizes again (into the same buffer) in backward
    reference   fastlora.reference.lora_linear_4bit (pure PyTorch)
    unsloth     unsloth's LoRA_W autograd Function, when unsloth is installed (never installed
                by fastlora)

Each provider's build(case) returns a Built: fn(x [M, K]) -> y [M, N] (differentiable in x
and in the LoRA tensors `params`). Dropout is 0 (the benchmark times the matmuls).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..cases import LoraCase


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


@dataclass
class Built:
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list  # trainable leaf tensors (LoRA A and B)
    # fastlora's base path to force while it runs, forward and backward (None: the dispatcher)
    base_path: Optional[str] = None


def _lora_leaves(case: LoraCase) -> tuple[torch.Tensor, torch.Tensor]:
    return (case.lora_A.detach().clone().requires_grad_(True),
            case.lora_B.detach().clone().requires_grad_(True))


def build_fastlora(case: LoraCase) -> Built:
    import fastlora

    a, b = _lora_leaves(case)
    return Built(lambda x: fastlora.lora_linear_4bit(x, case.packed, case.state, a, b,
                                                     case.scaling, case.bias), [a, b])


def build_fastlora_fused(case: LoraCase) -> Built:
    return dataclasses.replace(build_fastlora(case), base_path="fused")


def build_fastlora_dequant(case: LoraCase) -> Built:
    return dataclasses.replace(build_fastlora(case), base_path="dequant")


def build_reference(case: LoraCase) -> Built:
    from .. import reference

    a, b = _lora_leaves(case)
    return Built(lambda x: reference.lora_linear_4bit(x, case.packed, case.state, a, b,
                                                      case.scaling, case.bias), [a, b])


def peft_bnb_layer(case: LoraCase, magnitude: Optional[torch.Tensor] = None,
                   adapters: Optional[list] = None) -> torch.nn.Module:
    """peft.tuners.lora.bnb.Linear4bit around a bnb.nn.Linear4bit holding the case's packed
    weight (not re-quantised), with the case's A, B (in the activation dtype) and bias; with
    `magnitude` [N], a DoRA layer (use_dora=True) with that magnitude (float32, as PEFT's);
    with `adapters` (fastlora.MixedAdapter list), also adapters "a0", "a1", ... holding them
    (for PEFT's mixed batch, adapter_names=)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    n, k = case.state.shape
    rank = case.lora_A.shape[0]
    state = case.state
    # built on the meta device so no dense [N, K] weight is ever allocated
    base = bnb.nn.Linear4bit(k, n, bias=case.bias is not None, compute_dtype=case.lora_A.dtype,
                             compress_statistics=state.nested, quant_type=state.quant_type,
                             quant_storage=case.packed.dtype, device="meta")
    base.weight = bnb.nn.Params4bit(
        case.packed, requires_grad=False, quant_state=state.to_bnb(), blocksize=state.blocksize,
        compress_statistics=state.nested, quant_type=state.quant_type,
        quant_storage=case.packed.dtype, module=base, bnb_quantized=True)
    base.quant_state = base.weight.quant_state
    if case.bias is not None:
        base.bias = torch.nn.Parameter(case.bias.detach().clone(), requires_grad=False)
    alpha = case.scaling * rank
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        use_dora=magnitude is not None)
    layer = PeftLinear4bit(base, "default", config=config, r=rank, lora_alpha=alpha)
    layer.lora_A["default"].weight = torch.nn.Parameter(case.lora_A.detach().clone())
    layer.lora_B["default"].weight = torch.nn.Parameter(case.lora_B.detach().clone())
    if magnitude is not None:
        layer.lora_magnitude_vector["default"].weight = torch.nn.Parameter(
            magnitude.detach().float().clone())
    for i, adapter in enumerate(adapters or ()):
        r = adapter.lora_A.shape[0]
        layer.update_layer(f"a{i}", r, lora_alpha=adapter.scaling * r, config=LoraConfig(
            r=r, lora_alpha=adapter.scaling * r, lora_dropout=0.0))
        layer.lora_A[f"a{i}"].weight = torch.nn.Parameter(adapter.lora_A.detach().clone())
        layer.lora_B[f"a{i}"].weight = torch.nn.Parameter(adapter.lora_B.detach().clone())
        if abs(layer.scaling[f"a{i}"] - adapter.scaling) > 1e-12:
            raise RuntimeError(f"PEFT scaling {layer.scaling[f'a{i}']} != {adapter.scaling}")
    for i in range(len(adapters or ())):  # update_layer leaves only the active one trainable
        layer.lora_A[f"a{i}"].weight.requires_grad_(True)
        layer.lora_B[f"a{i}"].weight.requires_grad_(True)
    layer.train()  # training mode, as in fine-tuning (bnb repacks CPU weights in eval mode)
    if abs(layer.scaling["default"] - case.scaling) > 1e-12:
        raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {case.scaling}")
    return layer


def build_peft_bnb(case: LoraCase) -> Built:
    layer = peft_bnb_layer(case)
    return Built(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])


def _dequantize_into(buffer: torch.Tensor, packed: torch.Tensor, bnb_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    if buffer.is_cuda:
        return bnbF.dequantize_4bit(packed, bnb_state, out=buffer)
    # bitsandbytes 0.50 has no CPU kernel for dequantize_4bit(out=): copy (smoke pass only)
    return buffer.copy_(bnbF.dequantize_4bit(packed, bnb_state))


class _DequantMatmulLoRA(torch.autograd.Function):
    """y = x W^T + bias + s (x A^T) B^T with W dequantized into `buffer` (forward and again in
    backward: the dense weight is never kept between the two)."""

    @staticmethod
    def forward(ctx, x, a, b, packed, bnb_state, buffer, scaling, bias):
        w = _dequantize_into(buffer, packed, bnb_state)
        y = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        u = torch.mm(x, a.t())
        y.addmm_(u, b.t(), alpha=scaling)
        ctx.save_for_backward(x, u, a, b)
        ctx.weight = (packed, bnb_state, buffer)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, a, b = ctx.saved_tensors
        s = ctx.scaling
        du = torch.mm(dy, b).mul_(s)
        db = torch.mm(dy.t(), u).mul_(s)
        da = torch.mm(du.t(), x)
        dx = None
        if ctx.needs_input_grad[0]:
            w = _dequantize_into(ctx.weight[2], *ctx.weight[:2])
            dx = torch.mm(dy, w)
            dx.addmm_(du, a)
        return dx, da, db, None, None, None, None, None


def build_dequant_mm(case: LoraCase) -> Built:
    a, b = _lora_leaves(case)
    bnb_state = case.state.to_bnb()
    buffer = torch.empty(tuple(case.state.shape), dtype=case.state.dtype,
                         device=case.packed.device)
    return Built(lambda x: _DequantMatmulLoRA.apply(x, a, b, case.packed, bnb_state, buffer,
                                                    case.scaling, case.bias), [a, b])


def build_unsloth(case: LoraCase) -> Built:
    if importlib.util.find_spec("unsloth") is None:
        raise Unavailable("unsloth is not installed (fastlora never installs it)")
    if not case.packed.is_cuda:
        raise Unavailable("unsloth needs a CUDA GPU")
    if case.bias is not None:
        raise Unavailable("unsloth's LoRA_W takes no bias")
    try:
        from unsloth.kernels.fast_lora import LoRA_W
        from unsloth.kernels.utils import get_lora_parameters
    except Exception as exc:  # unsloth patches libraries on import; report, do not crash
        raise Unavailable(f"importing unsloth failed: {type(exc).__name__}: {exc}") from None
    layer = peft_bnb_layer(case)
    weights = get_lora_parameters(layer)
    # LoRA_W's backward reads x as [batch, seq, hidden]
    return Built(lambda x: LoRA_W.apply(x.unsqueeze(0), *weights).squeeze(0),
                 [layer.lora_A["default"].weight, layer.lora_B["default"].weight])


PROVIDERS = {"fastlora": build_fastlora, "fastlora_fused": build_fastlora_fused,
             "fastlora_dequant": build_fastlora_dequant, "peft_bnb": build_peft_bnb,
             "dequant_mm": build_dequant_mm, "reference": build_reference,
             "unsloth": build_unsloth}
BASELINE = "peft_bnb"  # speedups are relative to this one


def select_providers(spec: str) -> list[str]:
    """Comma-separated provider names or 'all' (ValueError on an unknown name)."""
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not names or names == ["all"]:
        return list(PROVIDERS)
    for name in names:
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}: choose from {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))
