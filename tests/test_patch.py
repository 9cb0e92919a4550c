"""fastlora.patch / unpatch on a real transformers + bitsandbytes + PEFT model (tiny Llama,
4-bit on the CPU, LoRA on all seven projections, random lora_B so the LoRA path counts).

How close is close enough for a whole model. fastlora.numerics' rule (err vs float64 truth <=
2 x plain PyTorch's err + one ulp) is applied with: truth = the same model in float64
(tiny_models.float64_twin: the exact dequantised weights, same adapters), plain PyTorch = the
unpatched PEFT model in the test dtype, for every tensor (logits, loss, each LoRA gradient).
numerics' atol is one ulp at each tensor's own scale, so gradients of ~1e-3 are held to their
own precision: each tensor's error must stay within twice the unpatched run's own error in that
dtype plus one ulp. That is the honest analogue of the per-layer rule for a deep model, where
both runs carry the same bf16 rounding of the non-LoRA parts (attention, norms, lm_head).
"""

import copy
import io
import logging
import types

import pytest
import torch

import fastlora
from fastlora import peft_patch
from fastlora.numerics import compare
import tiny_models as tm

N_LAYERS = 2 * len(tm.TARGETS)  # LoRA layers in the tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the layer calls that really took the fused path (a fused group op counts once
    per member: q/k/v and gate/up run as groups from a model's second forward on)."""
    calls = []
    real, real_group = peft_patch.fused_lora_forward, peft_patch.fused_group_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def counting_group(x, layers):
        calls.extend([1] * len(layers))
        return real_group(x, layers)

    monkeypatch.setattr(peft_patch, "fused_lora_forward", counting)
    monkeypatch.setattr(peft_patch, "fused_group_forward", counting_group)
    return calls


_step = tm.lora_step  # forward + backward: logits, loss, every LoRA gradient


CONFIGS = {  # quant_type, double_quant, compute dtype, quant storage, extra LoraConfig
    "nf4-dq-bf16": ("nf4", True, torch.bfloat16, torch.uint8, {}),
    "fp4-fp16-lora_bias": ("fp4", False, torch.float16, torch.uint8, {"lora_bias": True}),
    "nf4-dq-fp32": ("nf4", True, torch.float32, torch.uint8, {}),
    "nf4-bf16-storage_bf16": ("nf4", False, torch.bfloat16, torch.bfloat16, {}),
}


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed",  # Llama has no bias
                            "ignore:.*LoRA tensor\\(s\\) have invalid shape")  # lora_B.bias is 1-D
@pytest.mark.parametrize("config", CONFIGS)
def test_patched_matches_unpatched(model_dir, fused_calls, config, base_path):
    """Each config on each base-product path (fixture base_path: the fused GEMMs, or
    dequantize into the shared buffer + cuBLAS, which unpatch frees)."""
    quant_type, double_quant, dtype, storage, lora_kwargs = CONFIGS[config]
    model = tm.add_lora(tm.load_4bit(model_dir, quant_type, double_quant, dtype, storage),
                        **lora_kwargs)
    model.train()
    truth = _step(tm.float64_twin(model_dir, model).train())
    baseline = _step(model)
    report = fastlora.patch(model)
    assert report.patched == N_LAYERS and report.skipped == {}
    fused = _step(model)
    assert len(fused_calls) == N_LAYERS
    trainable = sum(p.requires_grad for p in model.parameters())
    assert set(fused) == set(truth) and len(fused) == 2 + trainable
    bad = [c.message() for c in (compare(k, fused[k], truth[k], baseline[k], dtype)
                                 for k in truth) if not c.ok]
    assert not bad, "\n".join(bad)
    from fastlora.launch import buffer

    # the dequantize path shares one buffer for all 14 layers: the largest layer's size
    largest = max(m.base_layer.weight.quant_state.shape.numel() for m in model.modules()
                  if hasattr(m, "base_layer") and hasattr(m.base_layer, "weight")
                  and hasattr(m.base_layer.weight, "quant_state"))
    held = buffer.allocated_bytes()
    assert held == (largest * torch.finfo(dtype).bits // 8 if base_path == "dequant" else 0)
    assert fastlora.unpatch(model) == N_LAYERS
    assert buffer.allocated_bytes() == 0


def _train(model_dir, patched: bool, checkpointing=None, steps: int = 10) -> list:
    """Per-step losses of AdamW (lr 1e-2) on one repeated batch, so the loss falls by ~13%
    in 10 steps and a 1% agreement means something."""
    model = tm.add_lora(tm.load_4bit(model_dir))
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # what peft.prepare_model_for_kbit_training does
    report = fastlora.patch(model) if patched else None
    if patched:
        assert report.patched == N_LAYERS
    losses = tm.train_losses(model, steps)
    if patched:  # q/k/v and gate/up ran as fused groups from step 2 on (test_grouping.py):
        assert report.groups == {2: 2, 3: 2}  # with checkpointing, recomputed as they ran
    return losses


@pytest.fixture(scope="module")
def unpatched_losses(model_dir):
    return _train(model_dir, patched=False)


# plain in the default tier; the other settings (30-45 s each in the interpreter) in the full
# tier: checkpointing's recomputation is checked in the default tier by
# test_checkpoint_recomputes_the_same_dropout, the dequantize path by the layer matrices
_FULL_TRAIN = pytest.mark.full("a training run per setting; the default tier trains once")


@pytest.mark.parametrize("checkpointing,path", [
    (None, "fused"), pytest.param("reentrant", "fused", marks=_FULL_TRAIN),
    pytest.param("non_reentrant", "fused", marks=_FULL_TRAIN),
    pytest.param(None, "dequant", marks=_FULL_TRAIN)],
    ids=["plain", "ckpt-reentrant", "ckpt-non_reentrant", "plain-dequant"])
def test_training_losses_agree(model_dir, unpatched_losses, checkpointing, path, monkeypatch):
    """10 bf16 steps, dropout 0: patched (with or without gradient checkpointing) vs unpatched
    PEFT, per-step losses within 1%. Both drift from an fp32 run by bf16 rounding (measured
    here: unpatched -0.3%, patched +0.2% at step 9), which is what the 1% leaves room for.
    The dequantize + cuBLAS path trains once too (without checkpointing: the time)."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", path)
    losses = _train(model_dir, patched=True, checkpointing=checkpointing)
    assert losses[-1] < 0.95 * losses[0], f"training did not progress: {losses}"
    rel = [abs(a - b) / b for a, b in zip(losses, unpatched_losses)]
    assert max(rel) < 0.01, (f"worst step {rel.index(max(rel))}: {max(rel):.2%}\n"
                             f"patched   {losses}\nunpatched {unpatched_losses}")


@pytest.mark.parametrize("reentrant,group", [(True, True), (False, True), (False, False)],
                         ids=["reentrant-grouped", "non_reentrant-grouped",
                              "non_reentrant-per_layer"])
def test_checkpoint_recomputes_the_same_dropout(model_dir, reentrant, group):
    """With dropout on, a checkpointed layer is run twice; the dropout seed comes from torch's
    generator, which checkpointing rewinds, so the recomputed mask and hence every gradient
    equal those of the run without checkpointing, bit for bit: with q/k/v and gate/up as
    fused groups (formed by a first forward) and per layer."""
    model = tm.add_lora(tm.load_4bit(model_dir), lora_dropout=0.25)
    model.train()
    model.enable_input_require_grads()
    report = fastlora.patch(model, group=group)
    _step(model)  # the groups form as the next forward starts
    torch.manual_seed(0)
    plain = _step(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(0)
    ckpt = _step(model)
    assert report.groups == ({2: 2, 3: 2} if group else {})
    different = [k for k in plain if not torch.equal(plain[k], ckpt[k])]
    assert not different, f"differ with checkpointing: {different[:5]}"


_logits = tm.logits
_close_fp32 = tm.assert_close_fp32


@pytest.mark.quick
def test_patch_keeps_parameters_and_unpatch_restores(model_dir):
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    params = [(n, id(p)) for n, p in model.named_parameters()]
    keys = list(model.state_dict())
    before = _logits(model)
    first = fastlora.patch(model)
    layers = [m for m in model.modules() if "forward" in m.__dict__]
    forwards = [m.forward for m in layers]
    second = fastlora.patch(model)
    assert first == second and first.patched == len(layers) == N_LAYERS
    assert [m.forward for m in layers] == forwards  # patching twice changes nothing
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert list(model.state_dict()) == keys
    _close_fp32(_logits(model), before, "patched logits")
    assert fastlora.unpatch(model) == N_LAYERS
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_logits(model), before)  # PEFT's own path again, bit for bit
    assert fastlora.unpatch(model) == 0


@pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear")
def test_forward_follows_the_layer_state(model_dir, tmp_path, fused_calls):
    """The patched forward reads the layer at call time: set_adapter / load_adapter switch
    what it computes; train()/eval() switch dropout; disabled and merged calls go to PEFT's
    forward (and give exactly PEFT's result); a mixed-batch call runs the fused mixed op
    (tests/test_mixed.py) and gives PEFT's result within fp32 rounding."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32), lora_dropout=0.3)
    model.save_pretrained(tmp_path / "adapter")
    model.load_adapter(tmp_path / "adapter", adapter_name="other", is_trainable=True)
    tm.randomize_lora_B(model, seed=5)  # now "default" and "other" differ
    model.eval()
    want = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        want[adapter] = _logits(model)
    with model.disable_adapter():
        want["disabled"] = _logits(model)
    want["mixed"] = _logits(model, adapter_names=["default", "other"])

    assert fastlora.patch(model).patched == N_LAYERS
    for adapter in ("other", "default"):
        model.set_adapter(adapter)
        _close_fp32(_logits(model), want[adapter], f"adapter {adapter}")
    assert (want["default"] - want["other"]).abs().max() > 0.05, "adapters do not differ"
    assert len(fused_calls) == 2 * N_LAYERS
    with model.disable_adapter():
        assert torch.equal(_logits(model), want["disabled"])
    _close_fp32(_logits(model, adapter_names=["default", "other"]), want["mixed"], "mixed")
    assert len(fused_calls) == 2 * N_LAYERS  # neither took the single-adapter op
    model.train()
    dropped = _logits(model)
    assert len(fused_calls) == 3 * N_LAYERS
    assert (dropped - want["default"]).abs().max() > 1e-2, "dropout 0.3 changed nothing"
    model.eval()
    model.merge_adapter()
    merged = _logits(model)
    assert len(fused_calls) == 3 * N_LAYERS
    report = fastlora.patch(model)  # re-examines: merged layers get PEFT's forward back
    assert report.patched == 0 and len(report.skipped[peft_patch.MERGED]) == N_LAYERS
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(merged, _logits(model))


@pytest.mark.quick
def test_save_load_patch_then_merge(model_dir, tmp_path):
    """save_pretrained of a patched model -> PeftModel.from_pretrained -> patch gives the same
    logits bit for bit; after unpatch, merge_and_unload works and keeps the adapter's effect."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    fastlora.patch(model)
    want = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tm.load_4bit(model_dir, compute_dtype=torch.float32),
                                       tmp_path / "adapter")
    assert fastlora.patch(loaded).patched == N_LAYERS
    assert torch.equal(_logits(loaded), want)
    assert fastlora.unpatch(loaded) == N_LAYERS
    with loaded.disable_adapter():
        base_only = _logits(loaded)
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
        merged = loaded.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    merged_logits = _logits(merged)
    # merging re-quantises W + s*B@A to 4 bits; the result must stay much nearer the adapted
    # model than the base model
    assert (merged_logits - want).abs().max() < 0.5 * (base_only - want).abs().max()


def test_compile_patched_layer(model_dir):
    """torch.compile (inductor, fullgraph: no graph break) of a patched layer, forward and
    backward, equals the eager patched layer."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.train()
    fastlora.patch(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 16, 64, device=tm.DEVICE)
    grads = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        y.square().sum().backward()
        grads.append((y.detach(), layer.lora_A["default"].weight.grad,
                      layer.lora_B["default"].weight.grad))
    for name, eager, compiled in zip(("y", "dA", "dB"), *grads):
        _close_fp32(compiled, eager, f"compiled {name}")


def _lora_grads(model) -> dict:
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
            if "lora_" in n}


def test_compile_whole_patched_model(model_dir, fused_calls):
    """The whole patched tiny Llama in training mode (dropout 0): torch._dynamo.explain finds
    one graph and no graph break, and torch.compile(model, fullgraph=True) trains: loss and
    every LoRA gradient equal eager's. Backend aot_eager (AOTAutograd through the ops' fake
    implementations and autograd formula): inductor's code generation for a whole model takes
    ~40 s on 2 CPU cores, and the inductor path is covered per layer above."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.train()
    assert fastlora.patch(model).patched == N_LAYERS
    ids, labels = tm.token_batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels=labels).loss
        loss.backward()
        results.append({"loss": loss.detach(), **_lora_grads(model)})
    torch._dynamo.reset()
    eager, compiled = results
    assert len(fused_calls) >= 2 * N_LAYERS  # explain, eager and the traced run went fused
    assert set(compiled) == set(eager) and len(eager) == 1 + 2 * N_LAYERS
    for name in eager:
        _close_fp32(compiled[name], eager[name], f"compiled {name}")


def test_compile_with_dropout_captures_the_seed_draw(model_dir):
    """With dropout > 0 in training the op draws its dropout seed as a tensor
    (fastlora.checks.seed_tensor) that the custom ops read inside: the draw joins the graph, so
    fullgraph compiles with torch's default settings, and under the same torch.manual_seed the
    compiled layer gives eager's output and gradients; two calls draw two masks."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32), lora_dropout=0.3)
    model.train()
    fastlora.patch(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 16, 64, device=tm.DEVICE)
    torch._dynamo.reset()
    runs = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        y = fn(x)
        y.square().sum().backward()
        runs.append((y.detach(), layer.lora_A["default"].weight.grad,
                     layer.lora_B["default"].weight.grad, fn(x).detach()))
    torch._dynamo.reset()
    for name, eager, compiled in zip(("y", "dA", "dB"), *runs):
        _close_fp32(compiled, eager, f"compiled {name}")
    y, again = runs[1][0], runs[1][3]
    assert (y - again).abs().max() > 1e-2, "two compiled calls drew the same dropout mask"


def test_pickle_and_deepcopy_keep_the_patch(model_dir, fused_calls):
    """torch.save(model) / torch.load(weights_only=False) and copy.deepcopy of a patched model
    give a model whose layers are patched (each bound to its own new layer), run the fused
    path and give the original's logits bit for bit; unpatch restores PEFT's forward there."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    assert fastlora.patch(model).patched == N_LAYERS
    want = _logits(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        calls = len(fused_calls)
        assert torch.equal(_logits(other), want)
        assert len(fused_calls) == calls + N_LAYERS
        assert sum(peft_patch._is_patched(m) for m in other.modules()) == N_LAYERS
        assert fastlora.unpatch(other) == N_LAYERS
        assert not any("forward" in m.__dict__ for m in other.modules())
        _close_fp32(_logits(other), want, "unpatched copy")
        assert len(fused_calls) == calls + N_LAYERS
    assert sum(peft_patch._is_patched(m) for m in model.modules()) == N_LAYERS


def test_fallback_warns_once_per_reason(model_dir, caplog):
    """A call the fused path cannot serve goes to PEFT's slower forward with a WARNING (so a
    user sees it), once per reason per process, not once per layer or call (conftest's
    fresh_log_once_state starts it with nothing logged)."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    fastlora.patch(model)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        for _ in range(2):
            with model.disable_adapter():
                _logits(model)
        _logits(model)  # fused: no warning
    warned = _logged(caplog)
    assert len(warned) == 1 and peft_patch.DISABLED in warned[0], warned


def _names(model, count=None):
    names = [n for n, m in model.named_modules() if isinstance(m, peft_patch._lora_4bit_class())]
    return names[:count] if count else names


def _logged(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.name == "fastlora" and r.levelno == level]


def test_report_alora(model_dir, caplog):
    """aLoRA (its offsets into the sequence are not in the kernels) keeps PEFT's forward;
    DoRA is served (tests/test_dora.py)."""
    model = tm.add_lora(tm.load_4bit(model_dir), alora_invocation_tokens=[5, 6],
                        task_type="CAUSAL_LM")  # older PEFT applies aLoRA to causal LMs only
    if not any(getattr(model.get_submodule(n), "lora_variant", {}) for n in _names(model)):
        pytest.skip("this PEFT release runs aLoRA configs on bitsandbytes 4-bit layers as "
                    "plain LoRA (no variant on the layer), which fastlora then serves")
    with caplog.at_level(logging.INFO, logger="fastlora"):
        report = fastlora.patch(model)
    assert report.patched == 0
    assert report.skipped == {peft_patch.VARIANT: _names(model)}
    assert len(_logged(caplog)) == 1 and peft_patch.VARIANT in _logged(caplog)[0]


def test_report_rank_above_256(model_dir, fused_calls):
    """The fused kernels support ranks 1..256: layers of a larger rank keep PEFT's forward
    (and still compute), the others are patched."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32),
                        rank_pattern={"q_proj": 257, "k_proj": 256})
    want = _logits(model)
    report = fastlora.patch(model)
    q_proj = [n for n in _names(model) if n.endswith("q_proj")]
    assert report.skipped == {peft_patch.RANK: q_proj} and len(q_proj) == 2
    assert report.patched == N_LAYERS - 2
    _close_fp32(_logits(model), want, "partly patched logits")
    assert len(fused_calls) == N_LAYERS - 2


def test_two_active_adapters(model_dir, fused_calls, caplog):
    """Layers with two active adapters are patched (mixed batches serve them, see
    test_mixed.py), but a plain call runs PEFT's forward (both adapters summed), logged
    once; with one active adapter again the fused op serves it."""
    from peft import LoraConfig

    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.add_adapter("other", LoraConfig(r=4, target_modules=list(tm.TARGETS)))
    tm.randomize_lora_B(model, 1)
    model.base_model.set_adapter(["default", "other"])
    want = _logits(model)
    report = fastlora.patch(model)
    assert report.patched == N_LAYERS and report.skipped == {}
    peft_patch._fallbacks_logged.discard(peft_patch.SEVERAL)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        got = _logits(model)
    assert peft_patch.SEVERAL in caplog.text and not fused_calls
    _close_fp32(got, want, "two active adapters")
    model.base_model.set_adapter("other")
    _logits(model)
    assert len(fused_calls) == N_LAYERS


@pytest.mark.quick
def test_report_bad_layers(model_dir, caplog):
    """Layers with a missing or inconsistent quant_state, a CPU-repacked weight, an fp64
    adapter or a merged adapter keep PEFT's forward; one log line per reason."""
    model = tm.add_lora(tm.load_4bit(model_dir))
    names = _names(model, 6)
    layers = [model.get_submodule(n) for n in names]

    def base_state(layer, **changes):
        state = copy.copy(layer.get_base_layer().weight.quant_state)
        for key, value in changes.items():
            setattr(state, key, value)
        layer.get_base_layer().weight.quant_state = state

    base_state(layers[1], blocksize=128)  # absmax no longer has one value per block
    shape = layers[4].get_base_layer().weight.quant_state.shape  # gate_proj: 128 x 64
    base_state(layers[4], shape=torch.Size(tuple(shape)[::-1]))  # [in, out]: same numel
    base_state(layers[3], packing_format_for_cpu=True)
    base = layers[0].get_base_layer()
    base.weight.quant_state = base.quant_state = None
    layers[2].lora_A["default"].double()
    with pytest.warns(UserWarning):
        layers[5].merge()
    with caplog.at_level(logging.INFO, logger="fastlora"):
        report = fastlora.patch(model)
    want = {peft_patch.NO_STATE: [names[0]], peft_patch.BAD_STATE: [names[1], names[4]],
            peft_patch.DTYPE: [names[2]], peft_patch.CPU_PACKED: [names[3]],
            peft_patch.MERGED: [names[5]]}
    assert report.skipped == want and report.patched == N_LAYERS - 6
    assert len(_logged(caplog)) == len(want)
    assert fastlora.unpatch(model) == N_LAYERS - 6


def test_no_lora_layers(model_dir, caplog):
    model = tm.load_4bit(model_dir)
    with caplog.at_level(logging.INFO, logger="fastlora"):
        report = fastlora.patch(model)
    assert report == fastlora.PatchReport(patched=0, skipped={})
    assert any("no PEFT LoRA layer" in m for m in _logged(caplog))
    assert fastlora.patch(torch.nn.Linear(4, 4)).patched == 0
    assert fastlora.unpatch(model) == 0


def test_instance_forward_left_alone(model_dir):
    """A layer whose forward is already replaced on the instance (an accelerate hook does
    that) is not patched, and unpatch keeps that forward."""
    model = tm.add_lora(tm.load_4bit(model_dir))
    layer = model.get_submodule(_names(model, 1)[0])
    hook = types.MethodType(lambda self, x: type(self).forward(self, x), layer)
    layer.forward = hook
    report = fastlora.patch(model)
    assert report.skipped == {peft_patch.WRAPPED: _names(model, 1)}
    assert fastlora.unpatch(model) == N_LAYERS - 1 and layer.forward == hook
