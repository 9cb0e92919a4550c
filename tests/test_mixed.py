"""Several adapters in one batch (issue 14): fastlora.mixed_linear_4bit against float64 truth,
fastlora.patch serving PEFT's `adapter_names=` (forward and generate), and
fastlora.adapter_batch training several adapters at once.

Truth: fastlora.reference.mixed_linear_4bit in float64 (PEFT's mixed-batch forward written
adapter by adapter, autograd); plain PyTorch: the same in the test dtype; the op (kernels in the
interpreter, or on the GPU) must stay within fastlora.numerics' bound for y, dx, every
adapter's dA and dB, and dbias. On the tiny Llama, patched runs are held to PEFT's own mixed
batch (fp32) and to a float64 twin with the same three adapters (bf16, PEFT being plain
PyTorch).
"""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch

import fastlora
from fastlora import MixedAdapter, peft_patch, reference
from fastlora.cases import make_mixed_case, mixed_fused, mixed_reference_pair, run_mixed
from fastlora.numerics import assert_close, compare
from helpers import DEVICE, DTYPES, RecordCreated
import tiny_models as tm

N_LAYERS = 2 * len(tm.TARGETS)
ADAPTERS = (("default", 4, 8), ("b", 8, 32), ("c", 16, 16))  # name, rank, alpha

CASES = [  # m, n, k, dtype, quant, bias, adapters (rank, scaling, dropout p)
    (40, 96, 160, "bf16", "nf4", True, ((8, 2.0, 0.1), (16, 0.5, 0.0), (4, 1.0, 0.2))),
    (33, 72, 128, "fp16", "fp4", False, ((16, 2.0, 0.0), (1, 3.0, 0.0))),
    (50, 64, 192, "fp32", "nf4", False, ((12, 1.5, 0.3), (8, 0.25, 0.3), (16, 2.0, 0.0),
                                         (4, 1.0, 0.1))),
    (7, 80, 128, "bf16", "nf4", True, ((16, 2.0, 0.0), (8, 1.0, 0.0), (8, 0.5, 0.0))),  # small M
    (3, 64, 128, "fp32", "fp4", False, ((4, 2.0, 0.1), (8, 1.0, 0.0))),  # small M, dropout
    # R = 256: without dropout the wide route (matmuls for the LoRA side), with it the kernels
    (64, 64, 128, "bf16", "nf4", False, tuple((16, 2.0, 0.0) for _ in range(16))),
    (40, 64, 128, "fp16", "nf4", True, tuple((16, 1.0 + i % 3, 0.1 * (i % 2)) for i in range(16))),
]


def _ids(c):
    ranks = "+".join(str(r) for r, _, _ in c[6])
    return f"m{c[0]}-n{c[1]}-k{c[2]}-{c[3]}-{c[4]}-{'bias' if c[5] else 'nobias'}-r{ranks}"


@pytest.mark.parametrize("m,n,k,dtype,quant_type,bias,spec", CASES, ids=[_ids(c) for c in CASES])
def test_mixed_matches_float64(m, n, k, dtype, quant_type, bias, spec):
    dt = DTYPES[dtype]
    case, adapters, rows = make_mixed_case(m, n, k, spec, dt, quant_type, bias)
    grad_out = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    truth, baseline = mixed_reference_pair(case, adapters, rows, dt, grad_out)
    out = run_mixed(mixed_fused, case, adapters, rows, dt, grad_out)
    assert set(out) == set(truth) and len([k for k in out if k.startswith("dA")]) == len(spec)
    for name, value in out.items():
        assert value.dtype == baseline[name].dtype, name
        assert_close(name, value, truth[name], baseline[name], dt)


@pytest.mark.quick
def test_per_sample_routing_and_base_rows():
    """row_adapter per sample of a [B, T, K] x routes every row of a sample; "__base__" rows
    (-1) get the base product alone, exactly what the op gives when B = 0; an adapter whose
    rows are absent gets zero gradients."""
    case, adapters, _ = make_mixed_case(4 * 5, 64, 128, ((8, 2.0, 0.0), (4, 1.0, 0.0),
                                                         (8, 1.0, 0.0)), torch.float32)
    x = case.x.reshape(4, 5, 128).clone()
    samples = [1, -1, 0, 1]  # adapter 2 has no rows
    per_row = torch.tensor(samples).repeat_interleave(5)
    lead = [a._replace(lora_A=a.lora_A.clone().requires_grad_(),
                       lora_B=a.lora_B.clone().requires_grad_()) for a in adapters]
    y = fastlora.mixed_linear_4bit(x, case.packed, case.state, lead, samples)
    y_rows = fastlora.mixed_linear_4bit(x.reshape(20, 128), case.packed, case.state, adapters,
                                        per_row)
    assert y.shape == (4, 5, 64)
    assert torch.equal(y.reshape(20, 64), y_rows)
    zero_b = [a._replace(lora_B=torch.zeros_like(a.lora_B)) for a in adapters]
    y_base = fastlora.mixed_linear_4bit(x, case.packed, case.state, zero_b, samples)
    assert torch.equal(y[1], y_base[1])
    assert not torch.equal(y[0], y_base[0])
    y.sum().backward()
    assert torch.count_nonzero(lead[2].lora_A.grad) == 0
    assert torch.count_nonzero(lead[2].lora_B.grad) == 0
    assert torch.count_nonzero(lead[1].lora_B.grad) > 0


def test_mixed_dropout_keeps_each_adapters_fraction():
    """Each row drops x's elements with its own adapter's p: the kept fraction of U's input,
    read back through A = identity rows, lies within 5 sigma of 1 - p per adapter, and the
    op's output is the reference's bit for bit in fp32 where the mask decides (kernels and
    reference draw one mask)."""
    m, k = 96, 128
    case, _, _ = make_mixed_case(m, 64, k, ((16, 1.0, 0.0),), torch.float32)
    eye = torch.eye(16, k)
    ps = (0.1, 0.5)
    adapters = [MixedAdapter(eye.clone(), torch.zeros(64, 16), 1.0, p) for p in ps]
    rows = torch.arange(m) % 2
    x = torch.ones(m, k)
    from fastlora.launch.mixed import mixed_forward, segments
    from fastlora.launch.selfcheck import use_kernels

    if not use_kernels(x, "nf4"):
        pytest.skip("the kernels do not run on this backend")
    seg = segments(rows.to(torch.int32), [16, 16], [1.0, 1.0], ps)
    _, u = mixed_forward(x, case.packed, case.state, torch.cat([a.lora_A for a in adapters]),
                         torch.cat([a.lora_B for a in adapters], 1), None, seg, 77)
    for g, p in enumerate(ps):
        kept = u[rows == g][:, 16 * g:16 * (g + 1)] * (1 - p)  # 1 where kept, 0 where dropped
        n = kept.numel()
        frac = float(kept.sum()) / n
        assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, frac)
        assert torch.count_nonzero(u[rows == g][:, 16 * (1 - g):16 * (2 - g)]) == 0
        keep = reference.dropout_mask(77, m, k, p)[rows == g][:, :16]
        assert torch.equal(kept.round().bool(), keep)


@pytest.mark.quick
def test_mixed_bad_input():
    case, adapters, rows = make_mixed_case(8, 64, 128, ((8, 2.0, 0.0), (4, 1.0, 0.0)),
                                           torch.float32)
    args = (case.x, case.packed, case.state)
    with pytest.raises(ValueError, match=r"entries must lie in \[-1, 2\)"):
        fastlora.mixed_linear_4bit(*args, adapters, torch.tensor([0, 1, 2, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="row_adapter has 3 entries; x has 8 rows"):
        fastlora.mixed_linear_4bit(*args, adapters, [0, 1, 0])
    with pytest.raises(TypeError, match="row_adapter must hold integers"):
        fastlora.mixed_linear_4bit(*args, adapters, rows.float())
    with pytest.raises(ValueError, match="non-empty sequence"):
        fastlora.mixed_linear_4bit(*args, [], rows)
    bad = [adapters[0], adapters[1]._replace(lora_B=adapters[1].lora_B[:, :2])]
    with pytest.raises(ValueError, match=r"adapters\[1\]: lora_B must be \[64, 4\]"):
        fastlora.mixed_linear_4bit(*args, bad, rows)
    with pytest.raises(ValueError, match=r"adapters\[0\]: dropout_p"):
        fastlora.mixed_linear_4bit(*args, [adapters[0]._replace(dropout_p=1.0)], rows)
    with pytest.raises(TypeError, match=r"adapters\[0\] must be a fastlora.MixedAdapter"):
        fastlora.mixed_linear_4bit(*args, ["nope"], rows)


def test_mixed_ranks_past_the_fused_rank_run_the_reference(caplog):
    """Adapters whose ranks sum past 256 run the PyTorch reference, said once at WARNING."""
    from fastlora.launch.selfcheck import use_kernels

    case, adapters, rows = make_mixed_case(8, 64, 128, ((200, 1.0, 0.0), (60, 1.0, 0.0)),
                                           torch.float32)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        y = fastlora.mixed_linear_4bit(case.x, case.packed, case.state, adapters, rows)
    want = reference.mixed_linear_4bit(case.x, case.packed, case.state, adapters, rows)
    assert torch.equal(y, want)
    if use_kernels(case.x, "nf4"):
        assert "sum to 260 > 256" in caplog.text


@pytest.mark.quick
def test_mixed_launches_are_the_plain_layers():
    """A mixed batch launches exactly what one plain fused layer does (U, the tiled GEMM;
    backward dU/dB, dA, the dx GEMM, their sums finished in-kernel): the routing lives in the
    kernels that run anyway."""
    from test_launches import counting

    if torch.cuda.is_available():
        pytest.skip("counts interpreter launches")
    case, adapters, rows = make_mixed_case(17, 72, 128, ((8, 2.0, 0.1), (4, 1.0, 0.0)),
                                           torch.bfloat16)

    def launches(mixed: bool):
        x = case.x.clone().requires_grad_()
        if mixed:
            lead = [a._replace(lora_A=a.lora_A.clone().requires_grad_(),
                               lora_B=a.lora_B.clone().requires_grad_()) for a in adapters]
            with counting(execute=True) as fwd:
                y = fastlora.mixed_linear_4bit(x, case.packed, case.state, lead, rows,
                                               training=True, seed=3)
        else:
            a = adapters[0].lora_A.clone().requires_grad_()
            b = adapters[0].lora_B.clone().requires_grad_()
            with counting(execute=True) as fwd:
                y = fastlora.lora_linear_4bit(x, case.packed, case.state, a, b, 2.0,
                                              dropout_p=0.1, training=True, seed=3)
        with counting(execute=True) as bwd:
            y.backward(torch.ones_like(y))
        return fwd, bwd
    assert launches(True) == launches(False)
    fwd, bwd = launches(True)
    assert sum(fwd.values()) == 2 and sum(bwd.values()) == 3, (fwd, bwd)
    # the wide route (summed rank past WIDE_RANK, no dropout): the LoRA side in matmuls, the
    # base products fused: one launch each way
    wide = [a._replace(dropout_p=0.0) for a in adapters] * 8  # 8 x (8 + 4) = 96 > 64
    x = case.x.clone().requires_grad_()
    with counting(execute=True) as fwd:
        y = fastlora.mixed_linear_4bit(x, case.packed, case.state, wide, rows % 16)
    with counting(execute=True) as bwd:
        y.backward(torch.ones_like(y))
    assert fwd == {"_nf4_lora_fwd_kernel": 1} and bwd == {"_nf4_lora_bwd_dx_kernel": 1}


def test_mixed_never_a_dense_weight(monkeypatch):
    """No [N, K] tensor is created on the fused path (inside the custom ops' bodies too)."""
    from fastlora.launch.selfcheck import use_kernels
    from fastlora.ops import mixed as ops_mixed

    n, k = 96, 160
    case, adapters, rows = make_mixed_case(40, n, k, ((8, 2.0, 0.1), (16, 0.5, 0.0)),
                                           torch.float32)
    if not use_kernels(case.x, "nf4"):
        pytest.skip("the kernels do not run on this backend")
    created = []
    for name in ("mixed_forward", "mixed_backward"):
        real = getattr(__import__("fastlora.launch.mixed", fromlist=[name]), name)

        def recorded(*args, _real=real, **kwargs):
            with RecordCreated(created):
                return _real(*args, **kwargs)
        monkeypatch.setattr(f"fastlora.launch.mixed.{name}", recorded)
    x = case.x.clone().requires_grad_()
    lead = [a._replace(lora_A=a.lora_A.clone().requires_grad_(),
                       lora_B=a.lora_B.clone().requires_grad_()) for a in adapters]
    with RecordCreated(created):
        y = ops_mixed.mixed_linear_4bit(x, case.packed, case.state, lead, rows, training=True,
                                        seed=1)
        y.sum().backward()
    assert created, "nothing recorded"
    dense = [c for c in created if len(c[1]) == 2 and c[1] in ((n, k), (k, n))]
    assert not dense, dense


# ----------------------------------------------------------------------------- PEFT models

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-mixed"))


def _three_adapters(model, dropout: float = 0.0):
    """PEFT LoRA on all seven projections with three adapters of ranks 4, 8 and 16 (scalings
    2, 4 and 1), every lora_B random."""
    from peft import LoraConfig

    (name0, r0, a0), *rest = ADAPTERS
    peft_model = tm.add_lora(model, r=r0, lora_alpha=a0, lora_dropout=dropout)
    for name, r, alpha in rest:
        peft_model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=list(tm.TARGETS)))
    tm.randomize_lora_B(peft_model, seed=3)
    return peft_model


def _twin(model_dir, peft_model):
    """The float64 twin (tiny_models.float64_twin) with all three adapters."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    twin = tm.float64_twin(model_dir, peft_model)
    for name, _, _ in ADAPTERS[1:]:
        twin.add_adapter(name, copy.deepcopy(peft_model.peft_config[name]))
        set_peft_model_state_dict(twin, get_peft_model_state_dict(peft_model, adapter_name=name),
                                  adapter_name=name)
    return twin.double()


@pytest.fixture
def mixed_calls(monkeypatch):
    calls = []
    real = peft_patch.fused_mixed_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(peft_patch, "fused_mixed_forward", counting)
    return calls


NAMES = ["default", "b", "__base__", "c", "b"]


@pytest.mark.parametrize("dtype,seq", [(torch.float32, 1), (torch.bfloat16, 12),
                                       (torch.bfloat16, 1)],
                         ids=["fp32-M1-per-sample", "bf16-batch", "bf16-M1-per-sample"])
def test_patched_mixed_batch_matches_peft(model_dir, mixed_calls, dtype, seq):
    """PEFT's mixed-batch forward (adapter_names, eval) vs the patched model, 5 samples of
    1 token (M = 5, the small-M path: generation's shape) or of 12: fp32 against PEFT within
    summation-order rounding; bf16 against the float64 twin within the bound, PEFT being plain
    PyTorch. Every layer took the fused mixed op."""
    model = _three_adapters(tm.load_4bit(model_dir, compute_dtype=dtype))
    model.eval()
    ids, _ = tm.token_batch(batch=len(NAMES), seq=seq)
    with torch.no_grad():
        want = model(ids, adapter_names=NAMES).logits
        truth = _twin(model_dir, model).eval()(ids, adapter_names=NAMES).logits
    report = fastlora.patch(model)
    assert report.patched == N_LAYERS
    with torch.no_grad():
        got = model(ids, adapter_names=NAMES).logits
    assert len(mixed_calls) == N_LAYERS
    if dtype == torch.float32:
        tm.assert_close_fp32(got, want, "mixed-batch logits")
    assert_close("logits", got, truth, want, dtype)
    # each sample is its adapter's own single-adapter forward
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                alone = model(ids[i:i + 1]).logits
        else:
            model.set_adapter(name)
            with torch.no_grad():
                alone = model(ids[i:i + 1]).logits
        c = compare(f"sample {i} ({name})", got[i:i + 1], truth[i:i + 1], alone, dtype)
        assert c.ok, c.message()


def test_patched_generate_with_adapter_names(model_dir, mixed_calls):
    """generate(adapter_names=...) on the patched model: the greedy tokens of PEFT's own
    mixed-batch generate (fp32), every step through the fused mixed op."""
    model = _three_adapters(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.eval()
    ids, _ = tm.token_batch(batch=len(NAMES), seq=4)
    kwargs = dict(adapter_names=NAMES, max_new_tokens=4, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    want = model.generate(ids, **kwargs)
    fastlora.patch(model)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert len(mixed_calls) == 4 * N_LAYERS  # prefill + 3 decode steps


def _sum_loss(model, ids):
    logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.full(
    "a second training run; checkpointing is checked per layer in the default tier"))],
    ids=["plain", "grad-checkpointing"])
def test_adapter_batch_gives_each_adapter_its_own_gradients(model_dir, mixed_calls,
                                                            checkpointing):
    """Training three adapters in one batch (fastlora.adapter_batch, fp32, summed token loss):
    each adapter's gradients equal those of a batch of its own samples alone, a "__base__"
    sample touches no adapter, and three AdamW steps over all adapters' parameters train them all."""
    model = _three_adapters(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.base_model.set_adapter([name for name, _, _ in ADAPTERS])  # all trainable
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    assert fastlora.patch(model).patched == N_LAYERS
    ids, _ = tm.token_batch(batch=len(NAMES), seq=8)
    model.zero_grad()
    with fastlora.adapter_batch(model, NAMES):
        _sum_loss(model, ids).backward()
    assert len(mixed_calls) >= N_LAYERS
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(mixed) == 2 * 3 * N_LAYERS
    for name, _, _ in ADAPTERS:
        picks = [i for i, n in enumerate(NAMES) if n == name]
        model.zero_grad()
        with fastlora.adapter_batch(model, [name] * len(picks)):
            _sum_loss(model, ids[picks]).backward()
        own = {n: p.grad for n, p in model.named_parameters()
               if p.grad is not None and f".{name}." in n}
        assert len(own) == 2 * N_LAYERS
        for n, grad in own.items():
            tm.assert_close_fp32(mixed[n], grad, n)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        with fastlora.adapter_batch(model, NAMES):
            loss = _sum_loss(model, ids)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


def test_mixed_batch_bad_input(model_dir, caplog):
    """Unknown names and non-strings: adapter_batch's clear error (PEFT's own for its
    adapter_names); a wrong-length list and merged adapters: PEFT's errors, patched or not;
    a DoRA adapter in the mix, or ranks past 256: PEFT's forward, the reason logged once."""
    from peft import LoraConfig

    model = _three_adapters(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.eval()
    fastlora.patch(model)
    ids, _ = tm.token_batch(batch=len(NAMES), seq=4)
    with pytest.raises(ValueError, match=r"names \['nope'\], which are no adapters"):
        with fastlora.adapter_batch(model, ["nope"] * len(NAMES)):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with fastlora.adapter_batch(model, "default"):
            pass
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(ids, adapter_names=["nope"] * len(NAMES))
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        with torch.no_grad(), fastlora.adapter_batch(model, NAMES[:2]):
            model(ids)
    model.base_model.merge_adapter(["b"])
    with pytest.raises(ValueError, match="merged adapters"):
        with torch.no_grad():
            model(ids, adapter_names=NAMES)
    model.base_model.unmerge_adapter()
    peft_patch._fallbacks_logged.clear()
    model.add_adapter("big", LoraConfig(r=250, lora_alpha=250, target_modules=list(tm.TARGETS)))
    model.add_adapter("dora", LoraConfig(r=4, use_dora=True, target_modules=list(tm.TARGETS)))
    fastlora.patch(model)
    names = ["big", "c", "__base__", "b", "big"]
    fastlora.unpatch(model)
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
    fastlora.patch(model)
    with caplog.at_level(logging.WARNING, logger="fastlora"), torch.no_grad():
        got = model(ids, adapter_names=names).logits
        with pytest.raises(ValueError, match="DoRA"):  # PEFT refuses DoRA in a mixed batch
            model(ids, adapter_names=["dora", "c", "__base__", "b", "b"])
    assert peft_patch.MIXED_RANK in caplog.text and peft_patch.MIXED_VARIANT in caplog.text
    tm.assert_close_fp32(got, want, "ranks past 256: PEFT's forward")


def test_mixed_op_compiles_fullgraph():
    """torch.compile(fullgraph=True, aot_eager) of the mixed op (the routing tensor given, as
    fastlora.patch passes it): the custom ops are opaque nodes; output and every gradient
    equal the eager op's."""
    case, adapters, rows = make_mixed_case(20, 64, 128, ((8, 2.0, 0.0), (4, 1.0, 0.0)),
                                           torch.float32)

    def f(x, a0, b0, a1, b1):
        leaves = [adapters[0]._replace(lora_A=a0, lora_B=b0),
                  adapters[1]._replace(lora_A=a1, lora_B=b1)]
        return fastlora.mixed_linear_4bit(x, case.packed, case.state, leaves, rows,
                                          training=True, _checked_rows=True)

    def run(fn):
        args = [case.x.clone().requires_grad_()] + [
            t.clone().requires_grad_() for a in adapters for t in (a.lora_A, a.lora_B)]
        y = fn(*args)
        y.sum().backward()
        return [y.detach()] + [a.grad for a in args]
    torch._dynamo.reset()
    for got, want in zip(run(torch.compile(f, backend="aot_eager", fullgraph=True)), run(f)):
        assert torch.equal(got, want)
