"""Builders of QLoRA layer cases: weights quantised by bitsandbytes itself, LoRA tensors, and the
float64 / plain-PyTorch references a kernel is judged against (fastlora.numerics).

Shared by tests/, `fastlora verify` and the benchmark smoke pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import bitsandbytes.functional as bnbF
import torch

from . import reference
from .ops import lora_linear_4bit
from .quant import QuantState

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bnb_weight(n: int, k: int, quant_type: str = "nf4", blocksize: int = 64,
               double_quant: bool = True, dtype: torch.dtype = torch.bfloat16,
               quant_storage: torch.dtype = torch.uint8, seed: int = 0, scale: float = 0.05):
    """A random [n, k] weight quantised by bitsandbytes; returns (packed, fastlora state)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(dtype).to(DEVICE)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type, quant_storage=quant_storage)
    return packed, QuantState.from_bnb(state)


@dataclass
class LoraCase:
    x: torch.Tensor
    packed: torch.Tensor
    state: QuantState
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: Optional[torch.Tensor]
    scaling: float
    dropout_p: float
    seed: int

    def args(self, dtype=None, requires_grad=False):
        """Positional args of lora_linear_4bit, tensors cast to `dtype` (fresh leaves)."""
        def prep(t):
            if t is None:
                return None
            t = t.detach().to(dtype or t.dtype).clone()
            return t.requires_grad_(requires_grad)
        return (prep(self.x), self.packed, self.state, prep(self.lora_A), prep(self.lora_B),
                self.scaling, prep(self.bias))

    def kwargs(self):
        return dict(dropout_p=self.dropout_p, training=self.dropout_p > 0, seed=self.seed)


def make_case(m: int, n: int, k: int, rank: int, dtype: torch.dtype, quant_type="nf4",
              blocksize=64, double_quant=True, bias=False, dropout_p=0.0, seed=0,
              lead: tuple = ()) -> LoraCase:
    """A LoRA layer case in `dtype`; B is random (not PEFT's zeros) so the LoRA path counts."""
    g = torch.Generator().manual_seed(1000 + seed)
    packed, state = bnb_weight(n, k, quant_type, blocksize, double_quant, dtype, seed=seed)
    x = torch.randn(*lead, m, k, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(rank, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(n, rank, generator=g) / rank**0.5).to(dtype).to(DEVICE)
    bvec = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    return LoraCase(x, packed, state, a, b, bvec, 2.0, dropout_p, 1234 + seed)


def run(fn, case: LoraCase, dtype, grad_out: Optional[torch.Tensor] = None):
    """Forward (and backward when grad_out is given; any device, moved to the case's) of `fn`
    on the case in `dtype`. Returns dict y, dx, dA, dB, dbias (grads None without grad_out)."""
    x, packed, state, a, b, s, bias = case.args(dtype, requires_grad=grad_out is not None)
    y = fn(x, packed, state, a, b, s, bias, **case.kwargs())
    out = {"y": y.detach()}
    if grad_out is not None:
        y.backward(grad_out.to(device=y.device, dtype=dtype))
        out.update(dx=x.grad, dA=a.grad, dB=b.grad, dbias=bias.grad if bias is not None else None)
    return out


def reference_pair(case: LoraCase, dtype, grad_out=None):
    """(truth in float64, plain PyTorch in dtype), both through fastlora.reference."""
    truth = run(reference.lora_linear_4bit, case, torch.float64, grad_out)
    baseline = run(reference.lora_linear_4bit, case, dtype, grad_out)
    return truth, baseline


def fused(*args, **kwargs):
    """fastlora.lora_linear_4bit (kernels or reference, as the backend says)."""
    return lora_linear_4bit(*args, **kwargs)
