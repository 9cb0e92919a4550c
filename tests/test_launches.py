"""Triton kernel launches per decoder layer (issues 11 and 13), counted at the kernels' entry point:
every Triton kernel launch goes through the runtime's `run` (the interpreter's
InterpretedFunction.run here, JITFunction.run on a GPU), which the counter wraps.

The tiny Llama's decoder layer has Llama's seven LoRA projections (q/k/v, o, gate/up, down), so
its counts are Llama-3-8B's per decoder layer. Forward and backward, M = 1 (generation) and
M = 4096 (training), per layer (patch(group=False)) and grouped (q/k/v and gate/up as groups),
with and without dropout. At M = 4096 the kernels are not executed (the counts depend on the
shapes only, and the interpreter would take minutes); at M = 1 they are. README.md
("Kernel launches per decoder layer") states these numbers.

What the counts are made of (fastlora/launch):
  forward, one layer:  U, then the tiled GEMM (M > 16) or the split-K GEMM (M <= 16), whose
                       last program per tile sums the K slices in the same launch; at M <= 2
                       without dropout on the fused path one launch (U and y: csrc_triton/
                       gemv.py)
  backward, one layer: dU/dB pass, dA pass, dx GEMM (the sums over row splits and column groups
                       are finished in-kernel by each tile's last program)
  a group of G:        one U pass for all; per member the GEMM as above, except at M <= 16
                       on the fused path: all members' split-K GEMMs in one launch; at
                       M <= 2 without dropout each member's one launch
                       one dU/dB pass for all; one dA pass; on the fused path (K on the
                       blocksize; GROUP_DX_TARGETS and the interpreter) one dx GEMM for all
                       members, else per member the dx step
"""

from __future__ import annotations

import collections

import pytest
import torch

import fastlora
import tiny_models as tm
from helpers import counting

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU-only: counts interpreter launches")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# per LoRA layer: U, then the fused GEMM (tiled, or split-K at M <= 16) or fastlora's dequantize
# kernel (its cuBLAS matmuls are not Triton launches and are not counted); at M <= 2 without
# dropout on the fused path U and y in one launch (issue 29). Issue 11's limits: forward <= 2,
# backward <= 3 (test_single_layer_within_issue_limits).
def single_fwd(m: int, base: str, dropout: float) -> int:
    return 1 if base == "fused" and m <= 2 and dropout == 0.0 else 2



SINGLE_BWD = 3  # the dx step is the fused GEMM or the dequantize kernel: one launch either way
LAYERS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": None,
          "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": None}


def expected(m: int, grouped: bool, base: str, dropout: float) -> tuple[int, int]:
    """(forward, backward) launches of one decoder layer, from the recipe above."""
    sizes = collections.Counter(g for g in LAYERS.values() if g) if grouped else {}
    alone = sum(1 for name, g in LAYERS.items() if not grouped or g is None)
    fwd = alone * single_fwd(m, base, dropout)
    bwd = alone * SINGLE_BWD
    for size in sizes.values():
        # at M <= 2 without dropout each member's one launch (U and y); else one U pass, then
        # at M <= 16 on the fused path one GEMM launch for all members (issue 29), else each
        # member's base product
        if single_fwd(m, base, dropout) == 1:
            fwd += size
        else:
            fwd += 1 + (1 if base == "fused" and m <= 16 else size)
        # one dU/dB pass and the group's dx GEMM for all members (issue 30)
        bwd += 1 + 1 + (1 if base == "fused" else size)
    return fwd, bwd


@pytest.mark.parametrize("m,dropout,base", [(1, 0.0, "fused"), (4096, 0.0, "fused"),
                                            (4096, 0.1, "fused"), (1, 0.1, "dequant")],
                         ids=["m1-p0", "m4096-p0", "m4096-p0.1", "m1-p0.1-dequant"])
def test_launches_per_decoder_layer(model_dir, m, dropout, base, monkeypatch):
    """Both base-product paths (FASTLORA_BASE_PATH), with and without dropout."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", base)
    counted = {}
    for grouped in (False, True):
        model = tm.add_lora(tm.load_4bit(model_dir), lora_dropout=dropout)
        model.train()
        model.enable_input_require_grads()  # every layer's dx is needed, as in QLoRA training
        report = fastlora.patch(model, group=grouped)
        batch, seq = (1, 1) if m == 1 else (32, m // 32)
        ids, labels = tm.token_batch(batch, seq)
        model(ids[:, :1], labels=labels[:, :1]).loss.backward()  # learns the groups
        with counting(execute=m == 1) as fwd:
            loss = model(ids, labels=labels).loss
        with counting(execute=m == 1) as bwd:
            loss.backward()
        layers = len(model.base_model.model.model.layers)
        assert report.groups == ({2: layers, 3: layers} if grouped else {})
        assert sum(fwd.values()) % layers == 0 and sum(bwd.values()) % layers == 0
        counted[grouped] = (sum(fwd.values()) // layers, sum(bwd.values()) // layers)
        if grouped:
            assert fwd["_lora_u_group_kernel"] == (0 if single_fwd(m, base, dropout) == 1
                                                   else 2 * layers)
            assert bwd["_lora_bwd_da_group_kernel"] == 2 * layers
            assert bwd["_lora_bwd_du_db_group_kernel"] == 2 * layers
    assert counted == {False: expected(m, False, base, dropout),
                       True: expected(m, True, base, dropout)}
    # fused: per layer and grouped 7 + 21 / 7 + 12 at M=1 (the one-launch gemv: grouped 8 + 18
    # with the group GEMM before it, 11 + 18 before that), per layer 14 + 21 and grouped
    # 11 + 12 at M=4096 (15 backward before the group's dU/dB pass, 18 before its dx GEMM;
    # before the in-kernel sums: per layer M=1 21 + 42, M=4096 14 + 42; grouped M=1 18 + 39,
    # M=4096 11 + 39)
    assert counted[True][0] <= counted[False][0] and counted[True][1] < counted[False][1]


@pytest.mark.parametrize("bias,p", [(False, 0.0), (True, 0.0), (False, 0.2)],
                         ids=["scaled-path", "bias", "dropout"])
def test_dora_launches_over_the_plain_layer(bias, p):
    """A DoRA layer (fastlora.dora_linear_4bit, M = 17: the tiled GEMMs) launches what the
    plain fused layer does plus: forward the norm pass and the scales kernel (and the fp32
    combine with a bias or dropout; with dropout also dropout(x) and a second GEMM); backward
    the column dot and the scales kernel (with dropout: dropout(x), dropout of dx's DoRA term
    and the second dx GEMM, dy @ W)."""
    from fastlora.cases import dora_magnitude, make_case

    case = make_case(17, 72, 128, 8, torch.bfloat16, bias=bias, dropout_p=p)
    mag = dora_magnitude(case)

    def launches(dora: bool):
        x, packed, state, a, b, s, bvec = case.args(requires_grad=True)
        kwargs = case.kwargs()
        with counting(execute=True) as fwd:
            if dora:
                y = fastlora.dora_linear_4bit(x, packed, state, a, b, s,
                                              mag.clone().requires_grad_(), bvec, **kwargs)
            else:
                y = fastlora.lora_linear_4bit(x, packed, state, a, b, s, bvec, **kwargs)
        with counting(execute=True) as bwd:
            y.backward(torch.ones_like(y))
        return fwd, bwd
    plain_fwd, plain_bwd = launches(False)
    dora_fwd, dora_bwd = launches(True)
    extra_fwd = {"_dora_norm_kernel": 1, "_dora_scales_kernel": 1}
    extra_bwd = {"_col_dot_kernel": 1, "_dora_scales_kernel": 1}
    if bias or p:
        extra_fwd["_dora_combine_kernel"] = 1
    if p:
        extra_fwd.update(_dropout_kernel=1, _nf4_lora_fwd_kernel=1)
        extra_bwd.update(_dropout_kernel=2, _nf4_lora_bwd_dx_kernel=1)
    assert dora_fwd == plain_fwd + collections.Counter(extra_fwd), dora_fwd
    assert dora_bwd == plain_bwd + collections.Counter(extra_bwd), dora_bwd


LIMITS = {"forward": 2, "backward": 3}  # issue 11: launches per layer, either path


@pytest.mark.quick
@pytest.mark.parametrize("m,p", [(1, 0.0), (1, 0.3), (17, 0.0), (17, 0.3)],
                         ids=["m1", "m1-dropout", "m17", "m17-dropout"])
def test_single_layer_within_issue_limits(m, p, monkeypatch):
    """One fused layer (fastlora.lora_linear_4bit, base product on the fused kernels): forward in
    at most 2 launches, 1 at M = 1 without dropout (M = 1 runs two K slices in the interpreter,
    so the in-kernel sums of the split-K partials are on the path), backward in at most 3, each
    kernel once."""
    from fastlora.cases import make_case

    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    case = make_case(m, 72, 128, 8, torch.bfloat16, bias=True, dropout_p=p)
    x, packed, state, a, b, s, bvec = case.args(requires_grad=True)
    with counting(execute=True) as fwd:
        y = fastlora.lora_linear_4bit(x, packed, state, a, b, s, bvec, **case.kwargs())
    with counting(execute=True) as bwd:
        y.backward(torch.ones_like(y))
    if m == 1 and p == 0.0:  # U and y in one launch (csrc_triton/gemv.py, issue 29)
        assert fwd == {"_nf4_lora_gemv_kernel": 1}
    else:
        gemm = "_nf4_lora_fwd_small_m_kernel" if m == 1 else "_nf4_lora_fwd_kernel"
        assert fwd == {"_lora_u_kernel": 1, gemm: 1}
    assert bwd == {"_lora_bwd_du_db_kernel": 1, "_lora_bwd_da_kernel": 1,
                   "_nf4_lora_bwd_dx_kernel": 1}
    assert sum(fwd.values()) <= LIMITS["forward"] and sum(bwd.values()) <= LIMITS["backward"]


def test_arrival_counters_are_left_at_zero(monkeypatch):
    """The kernels that finish their sums in-kernel (csrc_triton/common.py last_to_arrive) put
    every counter back to zero, so one buffer serves launch after launch with no clearing launch
    (what launch/common.arrival_counters does on a GPU). Here every launch of a single layer
    (M = 1: split-K forward; M = 40: several row splits in dU/dB and dA) and of a q/k/v group
    shares one buffer, handed out dirty-free only by the kernels themselves; the results are
    bit-identical to fresh zeroed counters per launch, and the buffer ends all zero."""
    from fastlora import cases
    from fastlora.launch import backward, forward, group

    def outputs():
        got = []
        for m in (1, 40):
            case = cases.make_case(m, 72, 128, 8, torch.bfloat16, bias=True, dropout_p=0.2)
            got.append(cases.run(cases.fused, case, torch.bfloat16,
                                 torch.randn(m, 72, generator=torch.Generator().manual_seed(m))))
        x, members = cases.make_group_case(40, 128, [(48, 8, 0.1, False)] * 3, torch.bfloat16)
        got.append(cases.run_group(cases.grouped, x, members, torch.bfloat16,
                                   cases.group_out_grads(members, 40)))
        return got

    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    fresh = outputs()
    shared = torch.zeros(4096, dtype=torch.int32)
    handed = []

    def reuse(device, n):
        handed.append(n)
        return shared[:n]
    for module in (backward, forward, group):
        monkeypatch.setattr(module, "arrival_counters", reuse)
    reused = outputs()
    # forward M=1 (split), du_db + da twice, the group's da: at least 6 launches shared it
    assert len(handed) >= 6, handed
    assert torch.count_nonzero(shared) == 0
    for before, after in zip(fresh, reused):
        assert set(before) == set(after)
        for name in before:
            if before[name] is not None:
                assert torch.equal(before[name], after[name]), name
