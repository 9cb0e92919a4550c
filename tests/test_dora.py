"""QDoRA (issue 12): fastlora.dora_linear_4bit against float64 truth, the reference against
PEFT's own DoRA layer, and fastlora.patch serving PEFT `use_dora=True` models.

Truth: fastlora.reference.dora_linear_4bit in float64 (autograd through PEFT's forward, not the
op's explicit backward); plain PyTorch: the same in the test dtype; the op (kernels in the
interpreter, or on the GPU) must stay within fastlora.numerics' bound for y, dx, dA, dB, the
magnitude's gradient and dbias. The reference itself is held to PEFT's DoRA layer (float32,
with PEFT's dropout module swapped for one drawing fastlora's mask, so both see one mask).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fastlora
from fastlora import peft_patch, quant, reference
from fastlora.ops import dora as ops_dora
from fastlora.cases import dora_magnitude, dora_reference_pair, run_dora, dora_fused
from fastlora.numerics import assert_close, compare
from helpers import DEVICE, DTYPES, RecordCreated, make_case
import tiny_models as tm

N_LAYERS = 2 * len(tm.TARGETS)

CASES = [  # m, n, k, rank, dtype, quant, double quant, bias, dropout p
    (17, 72, 192, 8, "bf16", "nf4", True, True, 0.0),
    (17, 72, 192, 8, "bf16", "nf4", True, False, 0.2),
    (33, 96, 128, 16, "fp16", "fp4", False, True, 0.1),
    (40, 64, 256, 12, "fp32", "nf4", True, True, 0.3),
    (100, 48, 128, 64, "fp32", "fp4", True, False, 0.0),
    (3, 80, 320, 4, "bf16", "fp4", True, True, 0.1),   # M <= 16: the small-M forward
    (1, 160, 128, 1, "fp16", "nf4", False, False, 0.0),
]


def _grad_out(m, n, seed=7):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("m,n,k,rank,dtype,quant_type,dq,bias,p", CASES,
                         ids=[f"m{c[0]}-n{c[1]}-k{c[2]}-r{c[3]}-{c[4]}-{c[5]}-dq{int(c[6])}-"
                              f"{'bias' if c[7] else 'nobias'}-p{c[8]}" for c in CASES])
def test_dora_matches_float64(m, n, k, rank, dtype, quant_type, dq, bias, p):
    dt = DTYPES[dtype]
    case = make_case(m, n, k, rank, dt, quant_type, 64, dq, bias, p, seed=rank)
    magnitude = dora_magnitude(case)
    grad_out = _grad_out(m, n)
    truth, baseline = dora_reference_pair(case, magnitude, dt, grad_out)
    out = run_dora(dora_fused, case, magnitude, dt, grad_out)
    assert set(out) == set(truth)
    for name, value in out.items():
        if value is None:
            assert truth[name] is None
            continue
        assert value.dtype == baseline[name].dtype, name
        assert_close(name, value, truth[name], baseline[name], dt)


def test_dora_without_dropout_is_deterministic_and_mns_one_is_lora():
    """Same inputs, bit-identical outputs and gradients; and with the magnitude at its
    initial value (the row norms, mns = 1) the DoRA layer is the plain LoRA layer."""
    case = make_case(17, 72, 128, 8, torch.float32, bias=True)
    mag = dora_magnitude(case)
    a = run_dora(dora_fused, case, mag, torch.float32, _grad_out(17, 72))
    b = run_dora(dora_fused, case, mag, torch.float32, _grad_out(17, 72))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    from fastlora.launch.dora import weight_norm

    norm = weight_norm(case.packed, case.state, case.lora_A, case.lora_B, case.scaling)
    x, packed, state, lora_A, lora_B, s, bias = case.args()
    y = fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, norm, bias)
    y_lora = fastlora.lora_linear_4bit(x, packed, state, lora_A, lora_B, s, bias)
    torch.testing.assert_close(y, y_lora, rtol=1e-6, atol=1e-6 * y_lora.abs().max().item())


@pytest.mark.quick
@pytest.mark.parametrize("bias", [False, True], ids=["scaled-path", "combine-path"])
def test_zero_magnitude_rows(bias):
    """Rows whose magnitude is exactly 0: y is 0 + bias there (the scaled path's 2^-64
    stand-in leaves far less than one ulp) and the magnitude's gradient, sum dy * z / norm,
    is still right (z is not lost)."""
    case = make_case(17, 72, 128, 8, torch.bfloat16, bias=bias)
    mag = dora_magnitude(case)
    mag[[0, 5, 71]] = 0.0
    grad_out = _grad_out(17, 72)
    truth, baseline = dora_reference_pair(case, mag, torch.bfloat16, grad_out)
    out = run_dora(dora_fused, case, mag, torch.bfloat16, grad_out)
    for name, value in out.items():
        if value is not None:
            assert_close(name, value, truth[name], baseline[name], torch.bfloat16)
    assert out["dmag"][[0, 5, 71]].abs().min() > 0
    want = case.bias[[0, 5, 71]].float() if bias else torch.zeros(3)
    torch.testing.assert_close(out["y"][:, [0, 5, 71]].float(),
                               want.expand(17, 3).to(out["y"].device), rtol=0, atol=1e-12)


def test_in_place_change_of_the_output_is_refused():
    """The scaled path saves its output (z = y / mns): changing y in place before backward
    makes autograd raise, as for any op that saves its output; nothing is silently wrong."""
    case = make_case(17, 72, 128, 8, torch.float32)
    x, packed, state, lora_A, lora_B, s, _ = case.args(requires_grad=True)
    y = fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, dora_magnitude(case))
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("bias,p", [(True, 0.2), (False, 0.0)],
                         ids=["dropout-combine", "scaled-path"])
def test_dora_never_a_dense_weight(monkeypatch, bias, p):
    """Forward + backward: no full dequantisation, no floating tensor of N * K elements
    (neither W nor B @ A), nothing saved for backward that is a mask or [N, K]."""
    m, n, k, r = 17, 72, 256, 8  # m < n: a tensor of n * k elements can only be a weight
    case = make_case(m, n, k, r, torch.bfloat16, bias=bias, dropout_p=p)
    mag = dora_magnitude(case)  # (the test's own setup dequantises; the op may not)
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")

    def forbidden(*args, **kwargs):
        raise AssertionError("the fused DoRA path dequantised the whole weight")
    monkeypatch.setattr(quant, "dequantize_4bit_torch", forbidden)
    monkeypatch.setattr(reference, "dequantize_4bit_torch", forbidden)
    monkeypatch.setattr(fastlora, "dequantize_4bit", forbidden)
    created = []

    # the custom ops' bodies run with the outer mode off: record inside them too
    def recorded(body):
        def run_recorded(*args, **kwargs):
            with RecordCreated(created):
                return body(*args, **kwargs)
        return run_recorded
    monkeypatch.setattr(ops_dora, "_forward", recorded(ops_dora._forward))
    monkeypatch.setattr(ops_dora, "_backward", recorded(ops_dora._backward))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with RecordCreated(created), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_dora(dora_fused, case, mag, torch.bfloat16, _grad_out(m, n))
    assert all(v is not None for k_, v in out.items() if k_ != "dbias" or bias)
    shapes = {c[1] for c in created}
    assert (m, n) in shapes and (m, k) in shapes and (m, r) in shapes, "nothing was recorded"
    # the bodies' own allocations were seen: the norm's and the column dot's fp32 parts
    assert any(c[2] == torch.float32 and len(c[1]) == 2 and c[1][1] == n for c in created)
    assert (n * k // 64,) in shapes, "the row-scaled absmax (N*K/blocksize) was not recorded"
    dense = [c for c in created if c[2].is_floating_point and torch.Size(c[1]).numel() >= n * k]
    assert not dense, f"floating tensors as large as the weight were created: {dense}"
    assert not [s for s in saved if s[1] == torch.bool], f"a mask was saved: {saved}"
    assert not [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= n * k]


@pytest.mark.quick
def test_dora_bad_input():
    case = make_case(5, 72, 128, 8, torch.float32)
    x, packed, state, lora_A, lora_B, s, _ = case.args()
    mag = torch.ones(72)
    with pytest.raises(ValueError, match=r"magnitude must be \[72\]"):
        fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, torch.ones(71))
    with pytest.raises(TypeError, match="magnitude must be a tensor"):
        fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, [1.0] * 72)
    with pytest.raises(TypeError, match="magnitude must be fp16"):
        fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, mag.int())
    with pytest.raises(ValueError, match="lora_B must be"):
        fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B[:, :4], s, mag)
    straddling = make_case(5, 72, 200, 8, torch.float32)  # K % 64 != 0
    x, packed, state, lora_A, lora_B, s, _ = straddling.args()
    with pytest.raises(ValueError, match="not a multiple of the quantisation blocksize"):
        fastlora.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, mag)
    # the reference serves it (the fused path's limit, not DoRA's)
    assert reference.dora_linear_4bit(x, packed, state, lora_A, lora_B, s, mag).shape == (5, 72)


# ----------------------------------------------------------------------------- PEFT

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-dora"))


class _FastloraMaskDropout(nn.Dropout):
    """nn.Dropout drawing fastlora's mask for a fixed seed: PEFT then sees dropout(x) as the
    fused op does (PEFT's own mask comes from torch's generator)."""

    def __init__(self, p, seed):
        super().__init__(p)
        self.seed = seed

    def forward(self, x):
        if not self.training:
            return x
        flat = x.reshape(-1, x.shape[-1])
        return reference.apply_dropout(flat, self.seed, self.p).reshape(x.shape)


@pytest.mark.quick
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.25, True), (0.25, False)])
def test_reference_is_peft_dora(model_dir, p, bias):
    """fastlora.reference.dora_linear_4bit (float64) against PEFT's DoRA Linear4bit (float32
    compute) on a real layer: output and the gradients of x, lora_A, lora_B and the magnitude.
    With dropout both read one mask; bias: a frozen bias on the base layer, which PEFT keeps
    outside the magnitude scaling."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32), r=8,
                        lora_dropout=0.1, use_dora=True)
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
    base = layer.get_base_layer()
    if bias:
        base.bias = nn.Parameter(torch.randn(base.out_features) * 0.1, requires_grad=False)
    layer.lora_dropout["default"] = _FastloraMaskDropout(p, seed=99)
    with torch.no_grad():  # a trained magnitude: mns != 1
        layer.lora_magnitude_vector["default"].weight.mul_(
            1 + 0.2 * torch.rand(base.out_features, generator=torch.Generator().manual_seed(3)))
    layer.train()
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(2, 5, base.out_features, generator=torch.Generator().manual_seed(2))
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight)

    def grads(y, xx, ps):
        return torch.autograd.grad(y, (xx, *ps), dy.to(y.dtype))

    xp = x.clone().requires_grad_()
    y_peft = layer(xp)
    g_peft = grads(y_peft, xp, params)
    state = base.weight.quant_state
    x64 = x.double().requires_grad_()
    ps64 = [t.detach().double().requires_grad_() for t in params]
    y_ref = reference.dora_linear_4bit(
        x64, base.weight.data, state, ps64[0], ps64[1], layer.scaling["default"], ps64[2],
        base.bias.double() if bias else None, dropout_p=p, training=True, seed=99)
    g_ref = grads(y_ref, x64, ps64)
    for name, got, want in zip(("y", "dx", "dA", "dB", "dmag"), (y_peft, *g_peft),
                               (y_ref, *g_ref)):
        tm.assert_close_fp32(got.double(), want.detach(), f"PEFT vs reference {name}")


@pytest.fixture
def dora_calls(monkeypatch):
    calls = []
    real = peft_patch.fused_dora_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(peft_patch, "fused_dora_forward", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patched_dora_matches_unpatched(model_dir, dora_calls, dtype):
    """A 4-bit tiny Llama with PEFT DoRA on all seven projections: patched vs unpatched
    logits, loss and every trainable gradient (lora_A, lora_B, the magnitudes), each within
    fastlora.numerics' bound of the float64 twin (PEFT's DoRA on the dense dequantised
    weights), plain PyTorch being the unpatched model. DoRA layers run one by one (no
    groups form)."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=dtype), use_dora=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape,
                                                generator=torch.Generator().manual_seed(5)))
    model.train()
    truth = tm.lora_step(tm.float64_twin(model_dir, model).train())
    baseline = tm.lora_step(model)
    report = fastlora.patch(model)
    assert report.patched == N_LAYERS and report.skipped == {}
    fused = tm.lora_step(model)
    assert len(dora_calls) == N_LAYERS
    fused = tm.lora_step(model)  # the second forward: still per layer, no group formed
    assert len(dora_calls) == 2 * N_LAYERS and report.groups == {}
    mags = [k for k in fused if "lora_magnitude_vector" in k]
    assert len(mags) == N_LAYERS
    trainable = sum(p.requires_grad for p in model.parameters())
    assert set(fused) == set(truth) and len(fused) == 2 + trainable
    bad = [c.message() for c in (compare(k, fused[k], truth[k], baseline[k], dtype)
                                 for k in truth) if not c.ok]
    assert not bad, "\n".join(bad)
    assert fastlora.unpatch(model) == N_LAYERS


def _train(model_dir, patched: bool, steps: int = 10) -> list:
    model = tm.add_lora(tm.load_4bit(model_dir), use_dora=True)
    model.train()
    if patched:
        assert fastlora.patch(model).patched == N_LAYERS
    return tm.train_losses(model, steps)


@pytest.mark.full("a training run; test_patched_dora_matches_unpatched checks the layers")
def test_dora_training_losses_agree(model_dir):
    """10 bf16 AdamW steps (dropout 0), patched vs unpatched PEFT DoRA: per-step losses within
    1%, and the loss falls."""
    want = _train(model_dir, patched=False)
    got = _train(model_dir, patched=True)
    assert got[-1] < 0.95 * got[0], f"training did not progress: {got}"
    rel = [abs(a - b) / b for a, b in zip(got, want)]
    assert max(rel) < 0.01, f"worst step {rel.index(max(rel))}: {max(rel):.2%}\n{got}\n{want}"


def test_dora_adapter_save_load_round_trips(model_dir, tmp_path):
    """save_pretrained of a patched DoRA model (magnitudes included) -> PeftModel.from_pretrained
    -> patch: the same logits bit for bit."""
    from peft import PeftModel

    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32), use_dora=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.1)
    fastlora.patch(model)
    want = tm.logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tm.load_4bit(model_dir, compute_dtype=torch.float32),
                                       tmp_path / "adapter")
    report = fastlora.patch(loaded)
    assert report.patched == N_LAYERS and report.skipped == {}
    assert torch.equal(tm.logits(loaded), want)


def test_dora_layer_with_straddling_blocks_is_reported(model_dir, caplog):
    """A DoRA layer whose quantisation blocks straddle rows keeps PEFT's forward, reported
    under its own reason; the others are served."""
    import copy

    model = tm.add_lora(tm.load_4bit(model_dir), use_dora=True)
    names = [n for n, m in model.named_modules()
             if isinstance(m, peft_patch._lora_4bit_class())]
    base = model.get_submodule(names[0]).get_base_layer()
    state = copy.copy(base.weight.quant_state)
    state.blocksize = 128  # in_features 64: a block of 128 spans two rows
    base.weight.quant_state = state
    with caplog.at_level(logging.INFO, logger="fastlora"):
        report = fastlora.patch(model)
    assert report.skipped == {peft_patch.DORA_BLOCKS: names[:1]}
    assert report.patched == N_LAYERS - 1


def test_compile_patched_dora_layer(model_dir):
    """The DoRA op is two torch.library custom ops: torch.compile (fullgraph, inductor) of a
    patched DoRA layer gives eager's output and gradients (x, A, B, magnitude) exactly."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32), use_dora=True)
    fastlora.patch(model)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def step(fn):
        y = fn(x)
        grads = torch.autograd.grad((y * y).sum(), [x, *params])
        return [y.detach(), *grads]
    eager = step(layer)
    compiled = step(torch.compile(layer, fullgraph=True))
    for name, got, want in zip(("y", "dx", "dA", "dB", "dmag"), compiled, eager):
        assert torch.equal(got, want), name
