"""Argument checks shared by every entry point (DESIGN.md "Layers": below the reference, the
launchers and the ops; above the format only): clear errors naming the argument, the limits
they check against, and the dropout seed's normalisation (a caller's int, or one drawn from
torch's generator).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import torch

from .quant import WEIGHT_DTYPES, QuantState

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The fused kernels' rank limit (their configs are compiled for padded ranks up to 256); the
# reference path takes any rank.
MAX_FUSED_RANK = 256
_SEED_LIMIT = 2**63


def as_quant_state(state) -> QuantState:
    if isinstance(state, QuantState):
        return state
    if type(state).__name__ == "QuantState" and hasattr(state, "absmax"):
        return QuantState.from_bnb(state)  # a bitsandbytes QuantState: wrap, sharing storage
    raise TypeError(f"state must be a fastlora.QuantState, got {type(state).__name__}")


def check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, dropout_p, training, seed,
                 allowed_dtypes=ACTIVATION_DTYPES + (torch.float64,)):
    """Validate the arguments of lora_linear_4bit; returns (effective dropout p, seed).

    Raises TypeError/ValueError naming the offending argument."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dtype not in allowed_dtypes:
        raise TypeError(f"x must be a floating tensor of dtype {allowed_dtypes}, got {x.dtype}")
    state = as_quant_state(state)
    state.validate(packed)
    if isinstance(packed, torch.Tensor) and packed.requires_grad:
        raise ValueError("packed must not require grad: the 4-bit base weight is frozen")
    n_out, k_in = state.shape
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x's last dimension is {x.shape[-1] if x.dim() else None} but the "
                         f"weight's in_features (state.shape[1]) is {k_in}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k_in or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must be [r, {k_in}] with r >= 1, got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n_out, rank):
        raise ValueError(f"lora_B must be [{n_out}, {rank}] (out_features, r of lora_A), "
                         f"got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}: cast them to one dtype "
                            "(or run under torch.autocast)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must be [{n_out}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias is {bias.dtype} but x is {x.dtype}")
    devices = {("x", x.device), ("lora_A", lora_A.device), ("lora_B", lora_B.device),
               ("packed", packed.device)}
    if bias is not None:
        devices.add(("bias", bias.device))
    if len({d for _, d in devices}) != 1:
        where = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda t: t[0]))
        raise ValueError(f"all tensors must be on one device: {where}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) \
            or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) \
            or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= int(seed) < _SEED_LIMIT):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    p = float(dropout_p) if training else 0.0
    return p, (int(seed) if seed is not None else None)


def check_magnitude(magnitude, x: torch.Tensor, n_out: int) -> None:
    """A DoRA magnitude vector: a floating [N] tensor on x's device (any float dtype: PEFT keeps
    it in float32; its gradient comes back in its own dtype)."""
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a tensor, got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (n_out,):
        raise ValueError(f"magnitude must be [{n_out}] (out_features), got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.dtype not in ACTIVATION_DTYPES + (torch.float64,):
        raise TypeError(f"magnitude must be fp16, bf16, fp32 or fp64, got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}")


def dora_fused_problem(state: QuantState) -> Optional[str]:
    """Why the fused DoRA path cannot serve a weight, or None. It scales W's rows through the
    absmax of their quantisation blocks, so every block must lie inside one row."""
    if state.shape[1] % state.blocksize:
        return (f"in_features {state.shape[1]} is not a multiple of the quantisation blocksize "
                f"{state.blocksize} (blocks straddle rows)")
    return None


def check_fused_rank(lora_A: torch.Tensor) -> None:
    """ValueError naming lora_A when its rank is past what the fused kernels serve."""
    if lora_A.shape[0] > MAX_FUSED_RANK:
        raise ValueError(f"lora_A has rank {lora_A.shape[0]}; the fused kernels support ranks "
                         f"1..{MAX_FUSED_RANK} (FASTLORA_BACKEND=reference runs any rank)")


def seed_tensor(seed: Optional[int], p: float, device: Any = "cpu") -> torch.Tensor:
    """The dropout seed as an int64 [1] tensor on `device` (x's), which the kernels read on
    the device and nothing reads on the host: the caller's int, else one drawn from the
    generator of that device (torch.manual_seed reproduces it; checkpoint recomputation,
    which restores the RNG states, draws the same one; a CUDA graph replays the draw, so every
    replay gets a fresh seed and a fresh mask, as torch's own dropout does under capture).
    Without dropout (p == 0) nothing reads it: uninitialised, no launch.

    A tensor, not an int, so that torch.compile traces the draw into the graph (a fresh seed
    per call) and the custom ops pass it to the kernels untouched: an `.item()` here would
    break the graph, and inside the op it would sync with the device (issue 30)."""
    if p == 0.0:
        return torch.empty(1, dtype=torch.int64, device=device)
    if seed is not None:
        return torch.full((1,), seed, dtype=torch.int64, device=device)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


class DeviceSeed(NamedTuple):
    """A dropout seed as the kernels take it: `tensor`, an int64 [1] tensor on the device
    holding the seed (seed_tensor), whose low 32-bit word the kernels load there, and `high`,
    the seed's high word as a host int (seed_high: 0 for every drawn seed), a kernel parameter
    (csrc_triton/common.py dropout_seed says why)."""
    tensor: torch.Tensor
    high: int = 0


def seed_high(seed: Optional[int]) -> int:
    """The high 32-bit word of a caller's seed (0 for a drawn one: drawn below 2**31)."""
    return int(seed) >> 32 if seed is not None else 0


def resolve_seed(seed: Optional[int], p: float, device: Any = "cpu") -> int:
    """seed_tensor's value as an int (the same draw, for code that runs eagerly on the host:
    the reference path); 0 without dropout."""
    return int(seed_tensor(seed, p, device)) if p > 0.0 else 0


def check_seed_arg(seed) -> None:
    """ValueError unless `seed` is what a launcher takes: an int in [0, 2**63) or a DeviceSeed
    (an int64 tensor of one element and its high word)."""
    if isinstance(seed, DeviceSeed):
        if not isinstance(seed.tensor, torch.Tensor) or seed.tensor.dtype != torch.int64 \
                or seed.tensor.numel() != 1:
            raise ValueError("a DeviceSeed's tensor must be int64 with one element")
        return
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63) or a fastlora.checks.DeviceSeed, "
                         f"got {seed!r}")


def check_dequant_dtype(dtype: Any) -> None:
    """TypeError unless `dtype` is one a 4-bit weight decodes to."""
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype}")


class GroupMember(NamedTuple):
    """One layer of a group that reads one input (fastlora.lora_group_4bit): its 4-bit base
    (packed, state), its adapter (lora_A [r, K], lora_B [N, r], scaling), its bias [N] or
    None, and its dropout (p, applied when the call is training; seed: None draws one)."""
    packed: torch.Tensor
    state: Any
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    seed: Optional[int] = None


def as_group_members(members) -> list[GroupMember]:
    """A non-empty sequence of GroupMember (or tuples of its fields) as a list of GroupMember;
    TypeError/ValueError otherwise."""
    if isinstance(members, (str, bytes)) or not hasattr(members, "__len__") or len(members) < 1:
        raise ValueError(f"members must be a non-empty sequence of fastlora.GroupMember, got "
                         f"{members!r:.80}")
    out = []
    for i, member in enumerate(members):
        if not isinstance(member, GroupMember):
            if not isinstance(member, (tuple, list)) or not 5 <= len(member) <= 8:
                raise TypeError(f"members[{i}] must be a fastlora.GroupMember (packed, state, "
                                f"lora_A, lora_B, scaling[, bias, dropout_p, seed]), got "
                                f"{type(member).__name__}")
            member = GroupMember(*member)
        out.append(member)
    return out


def check_group(x, members, training: bool, allowed_dtypes=ACTIVATION_DTYPES + (torch.float64,)
                ) -> list[GroupMember]:
    """Validate a group call: each member (as_group_members) checked as lora_linear_4bit's
    arguments against the same x. Returns the members with their state as a fastlora
    QuantState, their effective dropout p and their seed (an int, or None to be drawn)."""
    checked = []
    for i, member in enumerate(as_group_members(members)):
        state = as_quant_state(member.state)
        try:
            p, seed = check_inputs(x, member.packed, state, member.lora_A, member.lora_B,
                                   member.scaling, member.bias, member.dropout_p, training,
                                   member.seed, allowed_dtypes=allowed_dtypes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"members[{i}]: {exc}") from None
        checked.append(member._replace(state=state, dropout_p=p, seed=seed))
    return checked


class MixedAdapter(NamedTuple):
    """One adapter of a mixed batch (fastlora.mixed_linear_4bit): lora_A [r, K], lora_B [N, r],
    its scaling and its dropout p (applied when the call is training)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0


def check_mixed(x, packed, state, adapters, row_adapter, bias, training: bool, seed,
                allowed_dtypes=ACTIVATION_DTYPES + (torch.float64,), check_values: bool = True):
    """Validate a mixed-batch call: each adapter (a MixedAdapter or a tuple of its fields)
    checked as lora_linear_4bit's arguments against x, and row_adapter an integer tensor or
    sequence with one entry per row of x (x.shape[:-1]) or per sample (x.shape[0]), each in
    [-1, len(adapters)) (-1: the base alone). Returns (adapters with their effective dropout
    p, row_adapter as an int64 [rows] tensor on x's device, seed). A tensor's values are
    checked on the host (one synchronisation on a GPU) unless check_values is False (a
    caller that built the routing from names it checked)."""
    if isinstance(adapters, (str, bytes)) or not hasattr(adapters, "__len__") \
            or len(adapters) < 1:
        raise ValueError(f"adapters must be a non-empty sequence of fastlora.MixedAdapter, got "
                         f"{adapters!r:.80}")
    checked = []
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, MixedAdapter):
            if not isinstance(adapter, (tuple, list)) or not 3 <= len(adapter) <= 4:
                raise TypeError(f"adapters[{i}] must be a fastlora.MixedAdapter (lora_A, "
                                f"lora_B, scaling[, dropout_p]), got {type(adapter).__name__}")
            adapter = MixedAdapter(*adapter)
        try:
            p, seed = check_inputs(x, packed, state, adapter.lora_A, adapter.lora_B,
                                   adapter.scaling, bias, adapter.dropout_p, training, seed,
                                   allowed_dtypes=allowed_dtypes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"adapters[{i}]: {exc}") from None
        checked.append(adapter._replace(scaling=float(adapter.scaling), dropout_p=p))
    rows = math.prod(x.shape[:-1])
    if isinstance(row_adapter, torch.Tensor):
        if row_adapter.dtype.is_floating_point or row_adapter.dtype.is_complex \
                or row_adapter.dtype == torch.bool:
            raise TypeError(f"row_adapter must hold integers, got {row_adapter.dtype}")
        index = row_adapter.reshape(-1).to(torch.int64)
    else:
        try:
            values = [int(v) for v in row_adapter]
        except TypeError:
            raise TypeError(f"row_adapter must be an integer tensor or a sequence of ints, got "
                            f"{type(row_adapter).__name__}") from None
        index = torch.tensor(values, dtype=torch.int64)
    if index.numel() not in (rows, x.shape[0] if x.dim() > 1 else rows):
        raise ValueError(f"row_adapter has {index.numel()} entries; x has {rows} rows"
                         f"{f' in {x.shape[0]} samples' if x.dim() > 2 else ''}: give one "
                         "per row or one per sample")
    if index.numel() and check_values:
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= len(checked):
            raise ValueError(f"row_adapter's entries must lie in [-1, {len(checked)}) (-1: no "
                             f"adapter), got values from {low} to {high}")
    index = index.to(x.device)
    if index.numel() != rows:  # one per sample: each sample's rows take its adapter
        index = index.repeat_interleave(rows // max(1, x.shape[0]))
    return checked, index, seed
