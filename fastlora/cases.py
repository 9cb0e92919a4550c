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


# ----------------------------------------------------------------------------- groups

def make_group_case(m: int, k: int, spec, dtype: torch.dtype, quant_type: str = "nf4",
                    seed: int = 0):
    """(x [m, k], [GroupMember]) for a group that reads one x: spec holds one
    (out_features, rank, dropout p, bias) per member, each with its own bnb-quantised weight
    in `dtype`; x and the LoRA tensors are fp32 masters (run_group casts them)."""
    from .checks import GroupMember

    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(m, k, generator=g)
    members = []
    for i, (n, rank, p, bias) in enumerate(spec):
        packed, state = bnb_weight(n, k, quant_type, 64, True, dtype, seed=seed * 10 + i)
        a = torch.randn(rank, k, generator=g) / k**0.5
        b = torch.randn(n, rank, generator=g) / rank**0.5
        bvec = torch.randn(n, generator=g) * 0.1 if bias else None
        members.append(GroupMember(packed, state, a, b, 0.5 + i, bvec, p, 4321 + 7 * i))
    return x, members


def group_out_grads(members, m: int, seed: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, mb.lora_B.shape[0], generator=g) for mb in members]


def run_group(fn, x, members, dtype, dys) -> dict:
    """Forward + backward of fn(x, members) -> [y per member] in `dtype` on DEVICE: y<g>, dx
    and every member's dA<g>, dB<g> (and dbias<g>)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype).to(DEVICE).requires_grad_()
    x = leaf(x)
    cast = [mb._replace(lora_A=leaf(mb.lora_A), lora_B=leaf(mb.lora_B), bias=leaf(mb.bias))
            for mb in members]
    ys = fn(x, cast)
    sum((y.double() * dy.to(y.device).double()).sum() for y, dy in zip(ys, dys)).backward()
    out = {"dx": x.grad}
    for g, (y, mb) in enumerate(zip(ys, cast)):
        out.update({f"y{g}": y.detach(), f"dA{g}": mb.lora_A.grad, f"dB{g}": mb.lora_B.grad})
        if mb.bias is not None:
            out[f"dbias{g}"] = mb.bias.grad
    return out


def members_one_by_one(op):
    """fn(x, members) running `op` (lora_linear_4bit or the reference's) per member."""
    def fn(x, members):
        return [op(x, mb.packed, mb.state, mb.lora_A, mb.lora_B, mb.scaling, mb.bias,
                   mb.dropout_p, True, mb.seed) for mb in members]
    return fn


def group_reference_pair(x, members, dtype, dys):
    """(truth in float64, plain PyTorch in dtype): each member through fastlora.reference."""
    one = members_one_by_one(reference.lora_linear_4bit)
    return run_group(one, x, members, torch.float64, dys), run_group(one, x, members, dtype, dys)


def grouped(x, members):
    """fastlora.lora_group_4bit in training mode (kernels or reference, as the backend says)."""
    from .ops import lora_group_4bit

    return lora_group_4bit(x, members, training=True)


# ----------------------------------------------------------------------------- DoRA

def dora_magnitude(case: LoraCase, seed: int = 0) -> torch.Tensor:
    """A float32 DoRA magnitude [N] for a case: PEFT starts it at the row norms of
    W + s * B @ A (float64 here), which makes mns = 1; a trained one drifts, so each row is
    scaled by 1 + U(-0.2, 0.2) and the (mns - 1) terms count."""
    from .quant import dequantize_4bit_torch

    g = torch.Generator().manual_seed(2000 + seed)
    w = dequantize_4bit_torch(case.packed, case.state, torch.float64)
    norm = (w + case.scaling * (case.lora_B.double() @ case.lora_A.double())).norm(dim=1)
    drift = 1.0 + 0.4 * (torch.rand(norm.shape, generator=g, dtype=torch.float64) - 0.5)
    return (norm.cpu() * drift).float().to(norm.device)


def run_dora(fn, case: LoraCase, magnitude: torch.Tensor, dtype,
             grad_out: Optional[torch.Tensor] = None) -> dict:
    """`run` for a DoRA op fn(x, packed, state, A, B, s, magnitude, bias, ...): adds dmag
    (the magnitude stays float32, float64 when dtype is; its gradient in that dtype)."""
    x, packed, state, a, b, s, bias = case.args(dtype, requires_grad=grad_out is not None)
    mag = magnitude.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    mag = mag.clone().requires_grad_(grad_out is not None)
    y = fn(x, packed, state, a, b, s, mag, bias, **case.kwargs())
    out = {"y": y.detach()}
    if grad_out is not None:
        y.backward(grad_out.to(device=y.device, dtype=dtype))
        out.update(dx=x.grad, dA=a.grad, dB=b.grad, dmag=mag.grad,
                   dbias=bias.grad if bias is not None else None)
    return out


def dora_reference_pair(case: LoraCase, magnitude: torch.Tensor, dtype, grad_out=None):
    """(truth in float64, plain PyTorch in dtype), both through reference.dora_linear_4bit."""
    return (run_dora(reference.dora_linear_4bit, case, magnitude, torch.float64, grad_out),
            run_dora(reference.dora_linear_4bit, case, magnitude, dtype, grad_out))


def dora_fused(*args, **kwargs):
    """fastlora.dora_linear_4bit (kernels or reference, as the backend says)."""
    from .ops import dora_linear_4bit

    return dora_linear_4bit(*args, **kwargs)


# ----------------------------------------------------------------------------- mixed batches

def make_mixed_case(m: int, n: int, k: int, spec, dtype: torch.dtype, quant_type: str = "nf4",
                    bias: bool = False, seed: int = 0):
    """(LoraCase of the base, [MixedAdapter], row_adapter int64 [m]) for a mixed batch: spec
    holds one (rank, scaling, dropout p) per adapter; rows are routed round-robin over the
    adapters and one base-only slot (-1), so every slot has rows. The case's own lora_A /
    lora_B are unused (rank 1)."""
    from .checks import MixedAdapter

    case = make_case(m, n, k, 1, dtype, quant_type, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(3000 + seed)
    adapters = [MixedAdapter((torch.randn(r, k, generator=g) / k**0.5).to(dtype).to(DEVICE),
                             (torch.randn(n, r, generator=g) / r**0.5).to(dtype).to(DEVICE),
                             s, p) for r, s, p in spec]
    rows = torch.arange(m) % (len(spec) + 1) - 1
    rows = rows[torch.randperm(m, generator=g)].to(DEVICE)
    return case, adapters, rows


def run_mixed(fn, case: LoraCase, adapters, rows, dtype, grad_out=None) -> dict:
    """Forward (+ backward with grad_out) of fn(x, packed, state, adapters, rows, bias,
    training, seed) in `dtype`: y, dx, dA<g>, dB<g> (and dbias)."""
    x, packed, state, _, _, _, bias = case.args(dtype, requires_grad=grad_out is not None)
    cast = [a._replace(lora_A=a.lora_A.detach().to(dtype).clone().requires_grad_(
                           grad_out is not None),
                       lora_B=a.lora_B.detach().to(dtype).clone().requires_grad_(
                           grad_out is not None)) for a in adapters]
    training = any(a.dropout_p > 0 for a in adapters)
    y = fn(x, packed, state, cast, rows, bias, training, case.seed)
    out = {"y": y.detach()}
    if grad_out is not None:
        y.backward(grad_out.to(device=y.device, dtype=dtype))
        out["dx"] = x.grad
        for i, a in enumerate(cast):
            out.update({f"dA{i}": a.lora_A.grad, f"dB{i}": a.lora_B.grad})
        if bias is not None:
            out["dbias"] = bias.grad
    return out


def mixed_reference_pair(case: LoraCase, adapters, rows, dtype, grad_out=None):
    """(truth in float64, plain PyTorch in dtype), both through reference.mixed_linear_4bit."""
    return (run_mixed(reference.mixed_linear_4bit, case, adapters, rows, torch.float64,
                      grad_out),
            run_mixed(reference.mixed_linear_4bit, case, adapters, rows, dtype, grad_out))


def mixed_fused(*args, **kwargs):
    """fastlora.mixed_linear_4bit (kernels or reference, as the backend says)."""
    from .ops import mixed_linear_4bit

    return mixed_linear_4bit(*args, **kwargs)
