"""`fastlora.lora_group_4bit`, the grouped op family: several LoRA layers over 4-bit bases that
read the same input x (q/k/v, gate/up) in one op.

    [y_g] = [x @ deq(W_g)^T + s_g * dropout_g(x) @ A_g^T @ B_g^T + bias_g  for each member g]

Each member keeps its own weight, quant state, adapter, rank, scaling, bias and dropout (no
concatenated copy of anything). On the kernels, U for all members comes from one pass over x,
and in the backward all dA and dx's LoRA terms from one pass over x, dx's LoRA term written
once (fastlora/launch/group.py); each member's base products run as in the single-layer op.
The result is what the members' separate lora_linear_4bit calls return, for the same seeds.

A torch.autograd.Function (not a torch.library custom op): under torch.compile it runs the
members as separate lora_linear_4bit calls (custom ops the compiler sees as opaque nodes), with
the same results; fastlora.patch does the same. The reference backend, fp64 inputs and empty
inputs also run the members one by one (the reference of the group is its members).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import (ACTIVATION_DTYPES, GroupMember, as_group_members, check_group,
                      DeviceSeed, seed_high, seed_tensor)
from ..launch.selfcheck import use_kernels
from .linear import _autocast_inputs, lora_linear_4bit

__all__ = ["lora_group_4bit", "prepare_lora_group_4bit", "GroupMember"]


class _GroupFn(torch.autograd.Function):
    """Forward: fastlora.launch.group.group_forward; backward: group_backward. Saves x, every
    U_g, A_g and B_g (never a dequantized weight, never a mask: masks come from the seeds)."""

    @staticmethod
    def forward(ctx, members, x, *params):
        from ..launch.group import group_forward

        ys, us = group_forward(x, members)
        ctx.members = members
        ctx.has_bias = [mb.bias is not None for mb in members]
        ctx.save_for_backward(x, *us)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        from ..launch.group import group_backward

        x, *us = ctx.saved_tensors
        members = ctx.members
        needs = ctx.needs_input_grad  # (members, x, A_0, B_0, bias_0, A_1, ...)
        need_dx = needs[1]
        need_dA = any(needs[2 + 3 * g] for g in range(len(members)))
        need_dB = any(needs[3 + 3 * g] for g in range(len(members)))
        dys = [dy.contiguous() for dy in dys]
        dx, dAs, dBs = group_backward(dys, x, us, members, need_dx, need_dA, need_dB)
        grads = [None, dx if need_dx else None]
        for g, dy in enumerate(dys):
            dbias = None
            if needs[4 + 3 * g] and ctx.has_bias[g]:
                dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
            grads += [dAs[g] if dAs is not None and needs[2 + 3 * g] else None,
                      dBs[g] if dBs is not None and needs[3 + 3 * g] else None, dbias]
        return tuple(grads)


def _one_by_one(x, members, training: bool) -> list[torch.Tensor]:
    return [lora_linear_4bit(x, mb.packed, mb.state, mb.lora_A, mb.lora_B, mb.scaling, mb.bias,
                             mb.dropout_p, training, mb.seed) for mb in members]


def lora_group_4bit(x: torch.Tensor, members: Sequence[GroupMember],
                    training: bool = False) -> list[torch.Tensor]:
    """[y_g] for the members (fastlora.GroupMember: packed, state, lora_A, lora_B, scaling,
    bias=None, dropout_p=0.0, seed=None), all reading x [..., K]; differentiable in x and
    every A, B and bias. Dropout applies to a member when `training` and its dropout_p > 0,
    with its own mask (seed None: drawn from torch's generator, one per member, in order).
    Arguments, dtypes and autocast as fastlora.lora_linear_4bit; up to 4 members whose padded
    ranks (powers of two >= 16) sum to at most 128 (64 for fp32 at full precision) run as one
    fused op, other groups member by member (fastlora.launch.group.group_problem).

    Returns what [lora_linear_4bit(x, ...) for each member] returns for the same seeds."""
    from ..launch.group import full_precision_fp32, group_problem

    members = as_group_members(members)
    if isinstance(x, torch.Tensor):  # under torch.autocast: x and every adapter to its dtype
        cast = [_autocast_inputs(x, mb.lora_A, mb.lora_B, mb.bias) for mb in members]
        x = cast[0][0]
        members = [mb._replace(lora_A=a, lora_B=b, bias=bias)
                   for mb, (_, a, b, bias) in zip(members, cast)]
    members = check_group(x, members, training)
    if torch.compiler.is_compiling():
        return _one_by_one(x, members, training)  # seeds drawn in the graph, as there
    ranks = [mb.lora_A.shape[0] for mb in members]
    if group_problem(ranks, full_precision_fp32(x)) is not None \
            or x.dtype not in ACTIVATION_DTYPES or x.numel() == 0 \
            or not all(use_kernels(x, mb.state.quant_type) for mb in members):
        with torch.autocast(x.device.type, enabled=False):
            return _one_by_one(x, members, training)
    # seeds drawn here, in member order, as the members' own ops above would draw them
    members = [mb._replace(seed=DeviceSeed(seed_tensor(mb.seed, mb.dropout_p, x.device),
                                          seed_high(mb.seed))) for mb in members]
    lead = x.shape[:-1]
    params = [t for mb in members for t in (mb.lora_A, mb.lora_B, mb.bias)]
    ys = _GroupFn.apply(members, x.reshape(-1, x.shape[-1]), *params)
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


def prepare_lora_group_4bit(x: torch.Tensor, members: Sequence[GroupMember]):
    """lora_group_4bit(x, members) without dropout and without autograd at M <= 16, made cheap
    on the host (issue 29), as fastlora.prepare_lora_linear_4bit is for one layer: a callable
    (x) -> [y_g] for inputs of x's shape, dtype and device, everything checked and decided
    here, equal to lora_group_4bit's result bit for bit; None where such calls take
    lora_group_4bit's own path (the group does not fit the kernels, the reference backend,
    M = 0 or M > 16, no dispatcher pick yet, the dequantize path picked). Kept by the caller
    only while every member's tensors stay unchanged and the settings stay what they were."""
    from ..launch.group import full_precision_fp32, group_problem, prepare_group_forward

    members = check_group(x, members, False, allowed_dtypes=ACTIVATION_DTYPES)
    ranks = [mb.lora_A.shape[0] for mb in members]
    if group_problem(ranks, full_precision_fp32(x)) is not None or x.numel() == 0 \
            or not all(use_kernels(x, mb.state.quant_type) for mb in members):
        return None
    k, lead = x.shape[-1], x.shape[:-1]
    run = prepare_group_forward(x.reshape(-1, k), members)
    if run is None:
        return None
    return lambda x_: [y.reshape(*lead, y.shape[-1]) for y in run(x_.reshape(-1, k))]
