"""Launcher of csrc_triton/group.py: the grouped op (G <= 4 LoRA layers over one input x).

    group_forward(x, members) -> (ys, us)
        U_g = dropout_g(x) @ A_g^T for all members in one pass over x (_lora_u_group_kernel),
        then each member's base product y_g = x @ deq(W_g)^T + s_g U_g B_g^T + bias_g
        (launch/forward.py forward_with_u: the tiled or small-M kernel, or dequantize + cuBLAS;
        at M <= 16 on the fused path all members' split-K GEMMs in one launch, _group_gemm)
    group_backward(dys, x, us, members, need_dx, need_dA, need_dB) -> (dx, dAs, dBs)
        all dU_g, dB_g in one launch (one pass over each dy_g, _du_db_group); then all dA_g and
        dx's summed LoRA term in one pass over x (_lora_bwd_da_group_kernel, dx written once);
        then dx += sum_g dy_g @ deq(W_g) in one launch where _dx_group allows
        (_nf4_lora_bwd_dx_group_kernel, dx written once), else per member
        (launch/backward.py dx_gemm)

`members`: fastlora.checks.GroupMember records whose state is a fastlora QuantState, whose
dropout_p is the effective p and whose seed is an int or a fastlora.checks.DeviceSeed
(fastlora.checks.check_group makes them; the op passes DeviceSeeds).
Member g's mask is the one its own single-layer op draws with its seed, so the group computes
what the members' separate ops compute.

Configs: csrc_triton/group.py u_config / da_config, one fixed config per summed padded rank and
activation class (the group kernels are not autotuned), in the interpreter too.
"""

from __future__ import annotations

import math

import torch
import triton

from ..checks import MAX_FUSED_RANK, GroupMember
from ..reference import dropout_threshold
from .backward import (Configs, _parallelism, _parts, check_backward_args, du_db, dx_gemm,
                       m_bucket_of)
from . import dispatch
from .common import (LAUNCH_OPTIONS, arrival_counters, config_target, decode_flags,
                     dot_precision, kernel_entry, prepared_entry, seed_args, weight_args)
from .forward import (GEMV_MAX_M, SMALL_M_MAX, _forward_kernels, _small_m_kernels,
                      check_forward_args, forward_with_u, gemv_ready, lora_forward,
                      prepare_small_m, prepare_small_m_with_u, small_m_plan)

__all__ = ["group_forward", "prepare_group_forward", "group_backward", "group_problem",
           "check_group_size", "full_precision_fp32", "MAX_MEMBERS"]

MAX_MEMBERS = 4  # csrc_triton/group.py MAX_MEMBERS (a test keeps them equal)
MAX_TOTAL_R_PAD = 128  # csrc_triton/group.py MAX_TOTAL_R_PAD (a test keeps them equal)
MAX_TOTAL_R_PAD_IEEE = 64  # csrc_triton/group.py MAX_TOTAL_R_PAD_IEEE


def _kernels():
    from csrc_triton import group

    return group


def group_problem(ranks, full_precision_fp32: bool = False) -> str | None:
    """Why a group of these LoRA ranks cannot run as one fused op, or None: 1..MAX_MEMBERS
    members, each of a fused rank, whose padded ranks sum (to a power of two) to at most
    MAX_TOTAL_R_PAD, or MAX_TOTAL_R_PAD_IEEE for fp32 activations at full precision (FMA
    dots, fastlora.launch.common.dot_precision 'ieee')."""
    if not 1 <= len(ranks) <= MAX_MEMBERS:
        return f"a fused group has 1..{MAX_MEMBERS} members, got {len(ranks)}"
    if max(ranks) > MAX_FUSED_RANK:
        return f"a rank above {MAX_FUSED_RANK}"
    total = _kernels().total_r_pad(ranks)
    limit = MAX_TOTAL_R_PAD_IEEE if full_precision_fp32 else MAX_TOTAL_R_PAD
    if total > limit:
        what = " for fp32 at full precision" if full_precision_fp32 else ""
        return f"the ranks {list(ranks)} pad to {total} > {limit}{what}"
    return None


def full_precision_fp32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and dot_precision(x.dtype) == "ieee"


def check_group_size(members, x: torch.Tensor) -> None:
    """ValueError unless the group fits the kernels (group_problem) for activations x."""
    problem = group_problem([m.lora_A.shape[0] for m in members], full_precision_fp32(x))
    if problem is not None:
        raise ValueError(f"{problem}: run the members as separate ops")


def _check(x, members) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a 2-D [M, K] tensor (fold leading dims into M)")
    for member in members:
        if not isinstance(member, GroupMember):
            raise TypeError("members must be fastlora.checks.GroupMember records "
                            "(fastlora.checks.check_group makes them)")
        check_forward_args(x, member.packed, member.state, member.lora_A, member.lora_B,
                           member.scaling, member.bias, member.dropout_p, member.seed)
    check_group_size(members, x)


def _slot_args(values: list, g_max: int = MAX_MEMBERS) -> list:
    """Per-slot argument tuples, slots past the group repeating slot 0 (compiled out)."""
    return [values[g] if g < len(values) else values[0] for g in range(g_max)]


def _slot_consts(members) -> dict:
    """Each slot's constexprs: HAS_DROPOUTg and R_PADg."""
    consts = {}
    for g, member in enumerate(_slot_args(members)):
        consts[f"HAS_DROPOUT{g}"] = member.dropout_p > 0.0
        consts[f"R_PAD{g}"] = _kernels().r_pad(member.lora_A.shape[0])
    return consts


@kernel_entry
def group_forward(x: torch.Tensor, members: list, *, base=None):
    """([y_g [M, N_g]], [u_g [M, r_g]]) of every member, in x's dtype (x 2-D, any strides)."""
    _check(x, members)
    m, k = x.shape
    us = [torch.empty((m, mb.lora_A.shape[0]), dtype=x.dtype, device=x.device)
          for mb in members]
    if m == 0:
        return [torch.empty((m, mb.lora_B.shape[0]), dtype=x.dtype, device=x.device)
                for mb in members], us
    if _members_take_gemv(x, members):
        outs = [lora_forward(x, mb.packed, mb.state, mb.lora_A, mb.lora_B, mb.scaling, mb.bias,
                             mb.dropout_p, mb.seed, base=base, check=False) for mb in members]
        return [y for y, _ in outs], [u for _, u in outs]
    gk = _kernels()
    ranks = [mb.lora_A.shape[0] for mb in members]
    precision = dot_precision(x.dtype)
    cfg = gk.u_config(ranks, precision, x.dtype == torch.float32, config_target(x.device))
    slots = _slot_args([(mb.lora_A.contiguous(), u, mb.lora_A.shape[0],
                         *seed_args(mb.seed, mb.dropout_p, x.device),
                         dropout_threshold(mb.dropout_p), 1.0 / (1.0 - mb.dropout_p))
                        for mb, u in zip(members, us)])
    consts = _slot_consts(members)
    gk._lora_u_group_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, m, k, x.stride(0), x.stride(1), *[a for slot in slots for a in slot],
        G=len(members), **consts, DROPOUT_GROUPED=k % 8 == 0, PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    gemm = _group_gemm(x, members, base)
    if gemm is not None:
        return gemm(x, us), us
    ys = [forward_with_u(x, mb.packed, mb.state, u, mb.lora_B, mb.scaling, mb.bias, base=base)
          for mb, u in zip(members, us)]
    return ys, us


def _members_take_gemv(x: torch.Tensor, members: list) -> bool:
    """At M <= GEMV_MAX_M without dropout and with K block-aligned, each member runs its own
    one-launch CUDA-core forward (U and y, csrc_triton/gemv.py): the same launches and results,
    bit for bit, as the members called one by one (a group is formed only at a model's forward,
    and torch.compile calls members alone), one launch a member."""
    m, k = x.shape
    return 0 < m <= GEMV_MAX_M and all(
        gemv_ready(decode_flags(mb.packed, mb.state, k), mb.dropout_p) for mb in members)


def _shared_decode(members: list, k: int, dtype: torch.dtype) -> dict | None:
    """The decoder constexprs (launch/common.decode_flags) every member shares, for a kernel
    that runs all members in one launch; None where it cannot: members whose decode differs
    (blocksize, double quantisation), K not aligned to the blocksize, or fp32 at full
    precision (FMA dots), none of which the group kernels are compiled for."""
    flags = [decode_flags(mb.packed, mb.state, k) for mb in members]
    if any(f != flags[0] for f in flags[1:]) or not flags[0]["K_ALIGNED"] \
            or dot_precision(dtype) == "ieee":
        return None
    return flags[0]


def _group_gemm(x: torch.Tensor, members: list, base=None):
    """The members' M <= 16 products in one launch (csrc_triton/small_m.py
    _nf4_lora_fwd_small_m_group_kernel: their split-K GEMMs side by side, issue 29), prepared
    for x's shape: a callable (x2, us) -> [y_g]. None where they take forward_with_u one by
    one: a single member, M outside 1..16, a member whose base product is not settled on the
    fused path (launch/dispatch.py; on a GPU the first call of a shape times each member
    there), members whose decode differs (blocksize, double quantisation), K not aligned to
    the blocksize, or fp32 at full precision (FMA dots). NF4 and FP4 members share a launch:
    each slot takes its own code table."""
    m, k = x.shape
    ns = [mb.lora_B.shape[0] for mb in members]
    if len(members) < 2 or not 0 < m <= SMALL_M_MAX or any(
            dispatch.settled("forward", x.device, x.dtype, n=n, k=k, m=m, base=base,
                             kernel="small_m") != "fused"
            for n in ns):
        return None
    decode = _shared_decode(members, k, x.dtype)  # small_m.COMPILE_SPECS' cases
    if decode is None:
        return None
    precision = dot_precision(x.dtype)
    sm = _small_m_kernels()
    ranks = [mb.lora_A.shape[0] for mb in members]
    consts = {**decode, "PRECISION": precision, "G": len(members),
              "BLOCK_R": max(_forward_kernels().rank_block(r) for r in ranks),
              "BLOCK_M": sm.BLOCK_M, **LAUNCH_OPTIONS,
              **{f"HAS_BIAS{g}": mb.bias is not None
                 for g, mb in enumerate(_slot_args(members))}}
    kernel, meta, k_per_split, n_slices = small_m_plan(x.device, x.dtype, decode, m, sum(ns),
                                                       k, group=True)
    consts.update(meta)
    consts["SPLIT"] = split = n_slices > 1
    smallest = consts.get("BLOCK_N", sm.SMALLEST_BLOCK_N)
    n_counters = sum(triton.cdiv(n, smallest) for n in ns)
    launch = kernel[lambda meta_: (sum(triton.cdiv(n, meta_["BLOCK_N"]) for n in ns),
                                   n_slices)]
    weights = [weight_args(mb.packed, mb.state) for mb in members]
    biases = [mb.bias.contiguous() if mb.bias is not None else None for mb in members]
    device, dtype = x.device, x.dtype

    def run(x2, us):
        ys = [torch.empty((m, n), dtype=dtype, device=device) for n in ns]
        ws = torch.empty((n_slices, m, sum(ns)), dtype=torch.float32, device=device) \
            if split else ys[0]
        counters = arrival_counters(device, n_counters) if split else ws
        slots = _slot_args([
            (*w, u, mb.lora_B, bias if bias is not None else y, y, n, r, u.stride(0),
             u.stride(1), mb.lora_B.stride(0), mb.lora_B.stride(1), y.stride(0), y.stride(1),
             float(mb.scaling))
            for w, u, mb, bias, y, n, r in zip(weights, us, members, biases, ys, ns, ranks)])
        launch(x2, ws, counters, m, k, k_per_split, x2.stride(0), x2.stride(1),
               *[a for slot in slots for a in slot], **consts)
        return ys
    return run


def prepare_group_forward(x: torch.Tensor, members: list):
    """group_forward's ys without dropout at M <= 16, prepared once for inputs shaped like x
    (issue 29, host time; as launch/forward.py prepare_small_m): a callable (x2) -> [y_g]
    running the same launches on the same arguments (one U pass for all, then the group GEMM
    or each member's split-K GEMM), or None where a member's product would not take the
    fused small-M path without deciding something first. At M <= GEMV_MAX_M (no dropout, K
    block-aligned) each member's own prepared one-launch call instead (_members_take_gemv).
    Members and x are checked by the caller (the group fits: group_problem), and kept
    unchanged while the callable is."""
    m, k = x.shape
    if _members_take_gemv(x, members):
        calls = [prepare_small_m(x, mb.packed, mb.state, mb.lora_A, mb.lora_B, mb.scaling,
                                 mb.bias) for mb in members]
        if any(call is None for call in calls):
            return None

        def run_members(x2):  # each call holds its own interpreter guard
            return [call(x2) for call in calls]
        return run_members
    gemm = _group_gemm(x, members)
    y_launches = [prepare_small_m_with_u(x, mb.packed, mb.state, mb.lora_B, mb.scaling,
                                         mb.bias) for mb in members] if gemm is None else []
    if any(launch is None for launch in y_launches):
        return None
    gk = _kernels()
    zero = [mb._replace(dropout_p=0.0, seed=0) for mb in members]
    ranks = [mb.lora_A.shape[0] for mb in members]
    precision = dot_precision(x.dtype)
    cfg = gk.u_config(ranks, precision, x.dtype == torch.float32, config_target(x.device))
    adapters = [mb.lora_A.contiguous() for mb in members]
    consts = dict(_slot_consts(zero), G=len(members), DROPOUT_GROUPED=k % 8 == 0,
                  PRECISION=precision, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    u_launch = gk._lora_u_group_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)]
    device, dtype, no_dropout = x.device, x.dtype, dropout_threshold(0.0)
    unread_seed = seed_args(0, 0.0, device)  # no dropout: the kernel reads neither

    @prepared_entry
    def run(x2):
        us = [torch.empty((m, r), dtype=dtype, device=device) for r in ranks]
        slots = _slot_args([(a, u, r, *unread_seed, no_dropout, 1.0)
                            for a, u, r in zip(adapters, us, ranks)])
        u_launch(x2, m, k, x2.stride(0), x2.stride(1), *[a for slot in slots for a in slot],
                 **consts)
        if gemm is not None:
            return gemm(x2, us)
        return [launch(x2, u) for launch, u in zip(y_launches, us)]
    return run


@kernel_entry
def group_backward(dys: list, x: torch.Tensor, us: list, members: list, need_dx: bool,
                   need_dA: bool, need_dB: bool, *, base=None):
    """(dx [M, K] or None, [dA_g] or None, [dB_g] or None): the gradients of every member's
    y_g for the output gradients dys [M, N_g] (dx summed over the members)."""
    _check(x, members)
    if len(dys) != len(members) or len(us) != len(members):
        raise ValueError(f"dys and us must have one entry per member ({len(members)}), got "
                         f"{len(dys)} and {len(us)}")
    for dy, u, member in zip(dys, us, members):
        check_backward_args(dy, x, u, member.lora_A, member.lora_B, need_dB)
    m, k = x.shape
    need_du = bool(need_dx or need_dA)
    if m == 0 or not (need_du or need_dB):
        return (x.new_zeros(m, k) if need_dx else None,
                [torch.zeros_like(mb.lora_A) for mb in members] if need_dA else None,
                [torch.zeros_like(mb.lora_B) for mb in members] if need_dB else None)
    cfgs = Configs(x, None)
    dus, dBs = _du_db_group(cfgs, dys, us, members, need_du, need_dB)
    if not need_du:
        return None, None, dBs
    dx = x.new_empty(m, k) if need_dx else None
    dAs = _da_group(x, dus, members, dx, need_dA)
    if need_dx and not _dx_group(cfgs, dys, members, dx, base):
        for dy, member in zip(dys, members):
            dx_gemm(cfgs, dy, member.packed, member.state, dx, base=base)
    return dx, dAs, (dBs if need_dB else None)


def _du_db_group(cfgs: Configs, dys: list, us: list, members: list, need_du: bool,
                 need_dB: bool) -> tuple[list, list]:
    """([dU_g] or [None]s, [dB_g] or [None]s) of every member: dU_g = s_g * dy_g @ B_g,
    dB_g = s_g * dy_g^T @ U_g, in one launch (csrc_triton/backward.py
    _lora_bwd_du_db_group_kernel, issue 30: the members' column groups side by side, one row
    split plan for all), or per member (launch/backward.py du_db) for a single member or fp32
    activations (the group kernel ships 16-bit configs only: csrc_triton/backward.py says
    why)."""
    if len(members) < 2 or dys[0].dtype == torch.float32:
        outs = [du_db(cfgs, dy, u, mb.lora_B, mb.scaling, need_du, need_dB)
                for dy, u, mb in zip(dys, us, members)]
        return [du for du, _ in outs], [dB for _, dB in outs]
    device = dys[0].device
    m = dys[0].shape[0]
    ns = [mb.lora_B.shape[0] for mb in members]
    ranks = [mb.lora_A.shape[0] for mb in members]
    width = _parallelism(device)
    rows_per_split, splits = _parts(m, cfgs.largest("du_db_group", "BLOCK_M"),
                                    round(math.sqrt(width * m / sum(ns))))
    cols_per_group, _ = _parts(sum(ns), cfgs.largest("du_db_group", "BLOCK_N"),
                               triton.cdiv(width, splits))
    groups = [triton.cdiv(n, cols_per_group) for n in ns]
    f32 = dict(dtype=torch.float32, device=device)
    unused = torch.empty(0, **f32)  # stands for a workspace a flag switches off
    dus = [dy.new_empty(m, r) if need_du else None for dy, r in zip(dys, ranks)]
    dBs = [mb.lora_B.new_empty(n, r) if need_dB else None
           for mb, n, r in zip(members, ns, ranks)]
    slots = []
    for dy, u, mb, n, r, g, du, dB in zip(dys, us, members, ns, ranks, groups, dus, dBs):
        b = mb.lora_B
        u = (u if u.stride(1) == 1 else u.contiguous()) if need_dB else b  # unread without dB
        slots.append((dy, u, b, torch.empty((g, m, r), **f32) if need_du else unused,
                      torch.empty((splits, n, r), **f32) if need_dB else unused,
                      du if du is not None else dy, dB if dB is not None else b, n, r,
                      float(mb.scaling), dy.stride(0), dy.stride(1), u.stride(0),
                      b.stride(0), b.stride(1)))
    counters = arrival_counters(device, splits * len(members) + sum(groups))
    consts = {f"R_PAD_{g}": _kernels().r_pad(r) for g, r in enumerate(_slot_args(ranks))}
    cfgs.launch("du_db_group", lambda meta: (splits, sum(groups)),
                (m, rows_per_split, cols_per_group, m_bucket_of(m),
                 *[a for slot in _slot_args(slots) for a in slot], counters),
                dict(G=len(members), COMPUTE_DU=need_du, COMPUTE_DB=bool(need_dB), **consts,
                     DOT_PRECISION=dot_precision(dys[0].dtype)))
    return dus, dBs


def _dx_group(cfgs: Configs, dys: list, members: list, dx: torch.Tensor, base=None) -> bool:
    """dx += sum_g dy_g @ deq(W_g) in one launch (csrc_triton/backward.py
    _nf4_lora_bwd_dx_group_kernel, issue 30), dx holding the group's LoRA term; each member's
    packed weight read in place. False, launching nothing, where the members take dx_gemm one
    by one: a single member, a GPU the kernel is not compiled for (csrc_triton/backward.py
    GROUP_DX_TARGETS: sm_80, sm_86, sm_89, sm_100, sm_120; on sm_90 its headline tile spills), a
    member whose dx product is not settled on the fused path (launch/dispatch.py; on a GPU the
    first call of a shape times each member there), members whose decode differs (blocksize,
    double quantisation), K not aligned to the blocksize, or fp32 at full precision (FMA
    dots)."""
    from csrc_triton.backward import GROUP_DX_TARGETS

    m, k = dx.shape
    ns = [mb.lora_B.shape[0] for mb in members]
    if len(members) < 2 or not cfgs.runs_on(GROUP_DX_TARGETS):
        return False
    if any(dispatch.settled("dx", dx.device, dx.dtype, n=n, k=k, m=m, base=base) != "fused"
           for n in ns):
        return False
    decode = _shared_decode(members, k, dx.dtype)  # backward.COMPILE_SPECS' cases
    if decode is None:
        return False
    dys = [dy if dy.stride(1) == 1 else dy.contiguous() for dy in dys]  # rows contiguous
    slots = _slot_args([(dy, *weight_args(mb.packed, mb.state), n, dy.stride(0))
                        for dy, mb, n in zip(dys, members, ns)])
    cfgs.launch("dx_group", lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) *
                                          triton.cdiv(k, meta["BLOCK_K"]),),
                (dx, m, k, m_bucket_of(m), dx.stride(0), dx.stride(1),
                 *[a for slot in slots for a in slot]),
                dict(**decode, G=len(members), DOT_PRECISION=dot_precision(dx.dtype)),
                LAUNCH_OPTIONS)
    return True


def _da_group(x, dus, members, dx, need_dA):
    """[dA_g] (or None) and dx := sum_g dropout_g'(dU_g @ A_g) when dx is a tensor."""
    gk = _kernels()
    m, k = x.shape
    ranks = [mb.lora_A.shape[0] for mb in members]
    precision = dot_precision(x.dtype)
    cfg = gk.da_config(ranks, x.dtype == torch.float32, precision, config_target(x.device))
    block_m, block_k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    rows_per_split, splits = _parts(m, block_m,
                                    triton.cdiv(_parallelism(x.device), triton.cdiv(k, block_k)))
    f32 = dict(dtype=torch.float32, device=x.device)
    wss = [torch.empty((splits, r, k), **f32) if need_dA else torch.empty(0, **f32)
           for r in ranks]
    # dA_g: summed from its partials in the launch; lora_A stands in, unwritten, without dA
    das = [mb.lora_A.new_empty(r, k) if need_dA else mb.lora_A
           for mb, r in zip(members, ranks)]
    slots = _slot_args([(du, mb.lora_A.contiguous(), ws, da_g, mb.lora_A.shape[0],
                         *seed_args(mb.seed, mb.dropout_p, x.device),
                         dropout_threshold(mb.dropout_p), 1.0 / (1.0 - mb.dropout_p))
                        for du, mb, ws, da_g in zip(dus, members, wss, das)])
    consts = _slot_consts(members)
    dx_arg = dx if dx is not None else x  # unwritten when dx is not needed
    k_tiles = triton.cdiv(k, block_k)
    counters = arrival_counters(x.device, k_tiles) if need_dA else x
    gk._lora_bwd_da_group_kernel[(k_tiles, splits)](
        x, dx_arg, counters, m, k, rows_per_split, x.stride(0), x.stride(1), dx_arg.stride(0),
        dx_arg.stride(1), *[a for slot in slots for a in slot], G=len(members),
        COMPUTE_DA=bool(need_dA), WRITE_DX=dx is not None, **consts,
        DROPOUT_GROUPED=k % 8 == 0, DOT_PRECISION=precision, **cfg.kwargs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return das if need_dA else None
