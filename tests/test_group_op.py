"""fastlora.lora_group_4bit: several LoRA layers over 4-bit bases that read one input, as one op
(issue 13), against float64 truth and against the members' own lora_linear_4bit calls.

Truth: each member through fastlora.reference in float64; plain PyTorch: the same in the test
dtype; the grouped op (kernels in the interpreter, or on the GPU) must stay within
fastlora.numerics' bound (2 x plain PyTorch's error + one ulp) for every output and gradient.
"""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.launch.group import MAX_MEMBERS, group_problem
from fastlora.numerics import assert_close
from helpers import (DEVICE, DTYPES, bnb_weight, counting, group_out_grads as out_grads,
                     group_reference_pair, grouped, make_group_case as group_case,
                     members_one_by_one as one_by_one, run_group)

# (out_features, rank, dropout p, bias) per member: different N, ranks and dropout
QKV = ((72, 8, 0.1, True), (48, 16, 0.0, False), (40, 4, 0.2, True))
GATE_UP = ((96, 12, 0.0, False), (96, 12, 0.0, False))
FOUR = ((32, 1, 0.3, False), (40, 64, 0.0, True), (24, 8, 0.1, False), (56, 16, 0.0, False))

CASES = [  # (members, m, k, dtype, quant_type)
    (QKV, 17, 256, "bf16", "nf4"),
    (QKV, 1, 200, "fp16", "fp4"),     # K % blocksize != 0: the per-element decode
    (GATE_UP, 100, 256, "fp32", "nf4"),
    (FOUR, 33, 192, "bf16", "fp4"),
    (QKV[:1], 9, 256, "fp32", "nf4"),  # a group of one
    # M <= 16, K aligned: the members' GEMMs in one launch (the group GEMM, issue 29)
    (FOUR, 3, 256, "bf16", "nf4"),
    (QKV, 1, 256, "fp16", "fp4"),
]


@pytest.mark.parametrize("spec,m,k,dtype,quant", CASES,
                         ids=[f"G{len(c[0])}-m{c[1]}-k{c[2]}-{c[3]}-{c[4]}" for c in CASES])
def test_group_matches_float64_and_its_members(spec, m, k, dtype, quant):
    """Every output and gradient of the grouped op within the bound of float64 truth, and
    close to what the members' own fused ops give (the same masks: the seeds are the same)."""
    dt = DTYPES[dtype]
    x, members = group_case(m, k, spec, dt, quant)
    dys = out_grads(members, m)
    truth, plain = group_reference_pair(x, members, dt, dys)
    got = run_group(grouped, x, members, dt, dys)
    single = run_group(one_by_one(fastlora.lora_linear_4bit), x, members, dt, dys)
    assert set(got) == set(truth)
    for name in truth:
        assert got[name].dtype == dt, name
        assert_close(name, got[name], truth[name], plain[name])
        assert_close(f"{name} (per-layer ops)", single[name], truth[name], plain[name])
    # U and the LoRA terms come from the same masks: the outputs differ by rounding only
    for g in range(len(members)):
        scale = truth[f"y{g}"].abs().max().item()
        assert (got[f"y{g}"].double() - single[f"y{g}"].double()).abs().max() \
            <= 4 * torch.finfo(dt).eps * scale


@pytest.mark.quick
def test_dropout_masks_are_the_members_own():
    """With dropout on every member, the grouped forward equals the reference run with each
    member's own seed to rounding; swapping two members' seeds changes their outputs (each
    member draws its own mask, not a shared one)."""
    spec = ((64, 8, 0.5, False), (64, 8, 0.5, False))
    x, members = group_case(16, 128, spec, torch.float32)
    members = [mb._replace(lora_B=mb.lora_B * 10) for mb in members]  # LoRA term dominates
    dys = out_grads(members, 16)
    got = run_group(grouped, x, members, torch.float32, dys)
    swapped = [members[0]._replace(seed=members[1].seed), members[1]._replace(seed=members[0].seed)]
    other = run_group(grouped, x, swapped, torch.float32, dys)
    truth, plain = group_reference_pair(x, members, torch.float32, dys)
    for g in range(2):
        assert_close(f"y{g}", got[f"y{g}"], truth[f"y{g}"], plain[f"y{g}"])
        assert (got[f"y{g}"] - other[f"y{g}"]).abs().max() > 0.1


def test_too_large_groups_run_member_by_member(monkeypatch):
    """Ranks padding past 128 (or more than 4 members) still give the members' results: the op
    runs them one by one (group_problem says why); the kernels' limits are what they say."""
    assert group_problem([64, 64]) is None and group_problem([32, 32, 32]) is None
    assert "pad to 256" in group_problem([64, 64, 16])
    assert "1..4 members" in group_problem([8] * (MAX_MEMBERS + 1))
    assert "rank above 256" in group_problem([300, 8])
    assert group_problem([16, 16, 16], full_precision_fp32=True) is None
    assert "fp32 at full precision" in group_problem([32, 32, 32], full_precision_fp32=True)
    spec = ((32, 64, 0.0, False), (32, 64, 0.0, False), (32, 16, 0.0, False))
    x, members = group_case(5, 64, spec, torch.float32)
    calls = []
    real = fastlora.ops.group.lora_linear_4bit
    monkeypatch.setattr(fastlora.ops.group, "lora_linear_4bit",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    dys = out_grads(members, 5)
    got = run_group(grouped, x, members, torch.float32, dys)
    truth, plain = group_reference_pair(x, members, torch.float32, dys)
    assert len(calls) == 3
    for name in truth:
        assert_close(name, got[name], truth[name], plain[name])


@pytest.mark.quick
@pytest.mark.parametrize("k,per_member", [(256, False), (200, True)], ids=["k256", "k200"])
def test_group_dx_in_one_gemm(k, per_member, monkeypatch):
    """Issue 30: the members' dx products in one launch (_nf4_lora_bwd_dx_group_kernel, each
    member's packed weight read in place, dx written once) where K is on the blocksize; K off
    it (the per-element decode) runs each member's dx GEMM. dx within the bound of float64
    truth either way (NF4 and FP4 members together: each its own code table)."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    x, members = group_case(17, k, QKV, torch.bfloat16)
    packed, state = bnb_weight(QKV[2][0], k, "fp4", 64, True, torch.bfloat16, seed=8)
    members[2] = members[2]._replace(packed=packed, state=state)
    dys = out_grads(members, 17)
    truth, plain = group_reference_pair(x, members, torch.bfloat16, dys)
    with counting(execute=True) as launched:
        got = run_group(grouped, x, members, torch.bfloat16, dys)
    assert launched.get("_nf4_lora_bwd_dx_group_kernel", 0) == (0 if per_member else 1)
    assert launched.get("_nf4_lora_bwd_dx_kernel", 0) == (len(members) if per_member else 0)
    assert_close("dx", got["dx"], truth["dx"], plain["dx"])


@pytest.mark.parametrize("frozen", ["none", "B", "A-and-x"])
def test_group_du_db_in_one_launch(frozen):
    """Issue 30: every member's dU and dB in one launch (_lora_bwd_du_db_group_kernel, the
    members' column groups side by side), at a shape cut into 2 row splits and 1 + 2 column
    groups (the in-kernel sums of both members, each with its own counters). With the Bs
    frozen only dU is made, with the As and x frozen only dB; every gradient asked for within
    the bound of float64 truth."""
    spec = ((24, 8, 0.1, True), (40, 16, 0.0, False))
    dt = torch.bfloat16
    x, members = group_case(80, 128, spec, dt)
    dys = out_grads(members, 80)
    truth, plain = group_reference_pair(x, members, dt, dys)

    def leaf(t, grad):
        return None if t is None else t.detach().to(dt).to(DEVICE).requires_grad_(grad)
    train_a, train_b = frozen != "A-and-x", frozen != "B"
    xl = leaf(x, train_a)
    cast = [mb._replace(lora_A=leaf(mb.lora_A, train_a), lora_B=leaf(mb.lora_B, train_b),
                        bias=leaf(mb.bias, False)) for mb in members]
    with counting(execute=True) as launched:
        ys = grouped(xl, cast)
        sum((y.double() * dy.to(y.device).double()).sum() for y, dy in zip(ys, dys)).backward()
    assert launched["_lora_bwd_du_db_group_kernel"] == 1, launched
    assert "_lora_bwd_du_db_kernel" not in launched, launched
    got = {"dx": xl.grad}
    for g, mb in enumerate(cast):
        got.update({f"dA{g}": mb.lora_A.grad, f"dB{g}": mb.lora_B.grad})
    for name, value in got.items():
        wanted = train_b if name.startswith("dB") else train_a
        assert (value is not None) == wanted, name
        if wanted:
            assert_close(name, value, truth[name], plain[name])


@pytest.mark.parametrize("target,one_launch", [("sm_80", True), ("sm_89", True),
                                               ("sm_120", True), ("sm_100", True),
                                               ("sm_90", False)])
def test_group_dx_only_where_it_compiles_without_spills(target, one_launch):
    """The group's dx GEMM runs where its configs compile without spills
    (csrc_triton/backward.py GROUP_DX_TARGETS; sm_100 and sm_120 with their own headline
    tiles); on sm_90 the members keep their own dx GEMMs (launch/group._dx_group launches
    nothing and says so)."""
    from fastlora.gpus import CONFIG_FAMILY
    from fastlora.launch import group
    from fastlora.launch.backward import Configs

    x, members = group_case(17, 256, GATE_UP, torch.bfloat16)
    x = x.to(torch.bfloat16)
    members = [mb._replace(lora_A=mb.lora_A.to(torch.bfloat16),
                           lora_B=mb.lora_B.to(torch.bfloat16)) for mb in members]
    dys = [dy.to(torch.bfloat16) for dy in out_grads(members, 17)]
    cfgs = Configs(x, None)
    cfgs.tuned = (CONFIG_FAMILY[target], False, "ieee", target)  # as on such a GPU
    with counting(execute=False) as launched:
        ran = group._dx_group(cfgs, dys, members, torch.zeros_like(x))
    assert ran is one_launch
    assert launched == ({"_nf4_lora_bwd_dx_group_kernel": 1} if one_launch else {})


@pytest.mark.parametrize("m", [3, 17], ids=["m3", "m17"])
def test_members_of_both_4bit_types(m, monkeypatch):
    """An NF4 and an FP4 member in one group: each decoded with its own code table. At M <= 16
    the members' GEMMs share one launch, each slot with its own table (M = 3: the kernel
    once took slot 0's table for all, and decoded the FP4 member with NF4's)."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    x, members = group_case(m, 256, QKV, torch.bfloat16)
    packed, state = bnb_weight(QKV[1][0], 256, "fp4", 64, True, torch.bfloat16, seed=9)
    members[1] = members[1]._replace(packed=packed, state=state)
    assert {mb.state.quant_type for mb in members} == {"nf4", "fp4"}
    dys = out_grads(members, m)
    truth, plain = group_reference_pair(x, members, torch.bfloat16, dys)
    with counting(execute=True) as launches:
        got = run_group(grouped, x, members, torch.bfloat16, dys)
    group_gemms = launches["_nf4_lora_fwd_small_m_group_kernel"]
    assert group_gemms == (1 if m <= 16 else 0), launches
    for name in truth:
        assert_close(name, got[name], truth[name], plain[name])


def test_leading_dims_autocast_and_frozen_parts():
    """x [2, 3, K] under torch.autocast(bfloat16) with fp32 members; only some parameters
    require grad (a frozen member's A): the others' gradients flow, in their own dtype."""
    x, members = group_case(6, 128, GATE_UP, torch.float32)
    x = x.reshape(2, 3, 128).to(DEVICE).requires_grad_()
    members = [mb._replace(lora_A=mb.lora_A.to(DEVICE).requires_grad_(g == 1),
                           lora_B=mb.lora_B.to(DEVICE).requires_grad_())
               for g, mb in enumerate(members)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ys = fastlora.lora_group_4bit(x, members)
        want = [fastlora.lora_linear_4bit(x, mb.packed, mb.state, mb.lora_A, mb.lora_B,
                                          mb.scaling) for mb in members]
    assert [tuple(y.shape) for y in ys] == [(2, 3, 96)] * 2 and ys[0].dtype == torch.bfloat16
    for y, w in zip(ys, want):
        torch.testing.assert_close(y.float(), w.float(), rtol=2e-2, atol=2e-2)
    sum(y.float().sum() for y in ys).backward()
    assert members[0].lora_A.grad is None and members[1].lora_A.grad.dtype == torch.float32
    assert all(mb.lora_B.grad.dtype == torch.float32 for mb in members)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("members,error,match", [
    ([], ValueError, "non-empty"),
    ([object()], TypeError, r"members\[0\] must be a fastlora.GroupMember"),
    ("qkv", ValueError, "non-empty sequence"),
], ids=["empty", "not-a-member", "string"])
def test_bad_members(members, error, match):
    with pytest.raises(error, match=match):
        fastlora.lora_group_4bit(torch.randn(2, 64), members)


@pytest.mark.quick
def test_bad_member_names_its_index():
    x, members = group_case(3, 128, GATE_UP, torch.float32)
    bad = [members[0], members[1]._replace(lora_A=torch.randn(12, 64))]
    with pytest.raises(ValueError, match=r"members\[1\]: lora_A must be \[r, 128\]"):
        fastlora.lora_group_4bit(x, bad)
    with pytest.raises(TypeError, match=r"members\[0\]: lora_A is torch.float64"):
        fastlora.lora_group_4bit(x, [members[0]._replace(lora_A=members[0].lora_A.double())])


@pytest.mark.quick
def test_limits_match_the_kernels():
    """fastlora.launch.group states the kernels' limits without importing them at import
    time (csrc_triton loads lazily, after the interpreter is set up); they must agree."""
    from csrc_triton import group as kernels
    from fastlora.launch import group as launcher

    assert (launcher.MAX_MEMBERS, launcher.MAX_TOTAL_R_PAD, launcher.MAX_TOTAL_R_PAD_IEEE) == \
        (kernels.MAX_MEMBERS, kernels.MAX_TOTAL_R_PAD, kernels.MAX_TOTAL_R_PAD_IEEE)
