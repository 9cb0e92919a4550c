"""fastlora under TRL's trainers (issue 32): fastlora.FastLoRACallback patches the model TRL builds
(`peft_config`), and training, DPO's adapter-disabled reference pass and GRPO's generate-then-
train loop give what unpatched PEFT gives.

Tiny models built in-process (tests/tiny_models.py: a Llama and a Qwen2 with grouped-query
attention and q/k/v biases, vocab 320), the byte-level tokenizer of the demo
(fastlora.demo.byte_tokenizer), a few short text rows. Patched and unpatched runs share seed,
data and 4-bit weights. Losses are compared with SGD: Adam turns rounding-level differences on
entries whose gradient is ~0 into learning-rate-sized steps. Bounds:
  fp32 compute   tiny_models.assert_close_fp32 (fused and PEFT differ in summation order only)
  bf16 compute   fastlora.numerics' rule per step: |patched - truth| <= 2 |unpatched - truth|
                 + one bf16 ulp of the loss, truth the fp32 unpatched run
Liger-Kernel's Triton kernels do not run in the CPU interpreter: on the CPU the test checks that
the patch still finds every LoRA layer after Liger replaced the model's modules; training with
it is a cuda-marked test.
"""

from __future__ import annotations

import logging

import pytest
import torch

import fastlora
import tiny_models as tm
from fastlora import numerics
from fastlora.demo import byte_tokenizer
from helpers import counting

trl = pytest.importorskip("trl", reason="TRL is pinned in requirements-dev.txt "
                          "(pip install fastlora[trl])")
from peft import LoraConfig  # noqa: E402

VOCAB = 320  # the byte tokenizer's 258 tokens, rounded up to a multiple of 64
N_LAYERS = 2 * len(tm.TARGETS)
TEXTS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(8)]
CPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """{arch: saved tiny model} for the Llama and the grouped-query Qwen2."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    return {arch: tm.save_tiny(tmp_path_factory.mktemp(arch), arch, vocab=VOCAB, **ids)
            for arch in ("llama", "qwen2")}


def lora_config(**kwargs) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=list(tm.TARGETS),
                      task_type="CAUSAL_LM", **kwargs)


def common_args(tmp_path, dtype: torch.dtype, steps: int = 3, **kwargs) -> dict:
    """TrainingArguments shared by the trainers: SGD at a constant 0.1, every step logged."""
    return dict(output_dir=str(tmp_path), max_steps=steps, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=CPU,
                bf16=dtype == torch.bfloat16, seed=0, save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, **kwargs)


def logged(trainer, key: str) -> torch.Tensor:
    """The per-step values of `key` in the trainer's log history."""
    return torch.tensor([entry[key] for entry in trainer.state.log_history if key in entry],
                        dtype=torch.float64)


def fp32_adapter(trainer) -> None:
    """The trainer's LoRA weights back in fp32. TRL stores a 4-bit model's adapter in bf16 (its
    QLoRA recipe) whatever the compute dtype; PEFT then runs the LoRA path on bf16-rounded
    inputs and the fused op on the fp32 inputs, which differ by bf16 rounding, not the fp32
    bound. The fp32 comparisons therefore run an fp32 adapter; TRL's bf16 adapter is judged by
    fastlora.numerics' rule (test_sft_bf16_losses_within_bound, the adapter test)."""
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()


def sft_run(model_dir, tokenizer, tmp_path, patched: bool, dtype=torch.float32,
            checkpointing: bool = True, trl_adapter: bool = False, **kwargs):
    """SFTTrainer on the tiny model in 4 bits with `dtype` compute, three SGD steps; returns
    (trainer, callback or None). fp32 runs get an fp32 adapter (fp32_adapter) unless
    `trl_adapter`."""
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset

    model = tm.load_4bit(model_dir, compute_dtype=dtype)
    callback = fastlora.FastLoRACallback() if patched else None
    args = SFTConfig(**common_args(tmp_path, dtype), per_device_train_batch_size=2,
                     max_length=32, gradient_checkpointing=checkpointing, **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer, peft_config=lora_config(),
                         callbacks=[callback] if patched else None)
    if dtype == torch.float32 and not trl_adapter:
        fp32_adapter(trainer)
    trainer.train()
    return trainer, callback


def assert_fused(callback) -> None:
    """The callback patched every LoRA layer and q/k/v, gate/up formed groups."""
    report = callback.report
    assert report is not None and report.patched == N_LAYERS and not report.skipped, report
    assert report.groups == {2: 2, 3: 2}, report


# ----------------------------------------------------------------------------- the callback

@pytest.mark.quick
def test_callback_arguments_and_model_checks(model_dirs):
    """Bad arguments and a model fastlora cannot fuse are clear errors (or, by default, a
    warning and PEFT's forward)."""
    from transformers import TrainerState, TrainingArguments

    with pytest.raises(TypeError, match="unpatch_at_end must be a bool"):
        fastlora.FastLoRACallback(unpatch_at_end="yes")
    args, state = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState()
    with pytest.raises(TypeError, match="passed no model"):
        fastlora.FastLoRACallback().on_train_begin(args, state, None)
    plain = tm.load_4bit(model_dirs["llama"])  # 4-bit, but no LoRA layer
    with pytest.raises(RuntimeError, match="no layer fused"):
        fastlora.FastLoRACallback(require_patched=True).on_train_begin(args, state, None,
                                                                      model=plain)
    callback = fastlora.FastLoRACallback()
    callback.on_train_begin(args, state, None, model=plain)
    assert callback.report.patched == 0


def test_callback_in_a_plain_trainer(model_dirs, tmp_path, caplog):
    """Any transformers.Trainer: patched at train begin, the report logged once (with the
    groups, which form at the second forward), unpatched at the end when asked."""
    from transformers import Trainer, TrainingArguments

    model = tm.add_lora(tm.load_4bit(model_dirs["llama"], compute_dtype=torch.float32))
    ids, _ = tm.token_batch(batch=4, seq=16)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    callback = fastlora.FastLoRACallback(unpatch_at_end=True)
    args = TrainingArguments(**common_args(tmp_path, torch.float32),
                             per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="fastlora"):
        trainer.train()
    assert_fused(callback)
    reports = [r.getMessage() for r in caplog.records if "groups sharing an input" in
               r.getMessage()]
    assert reports == [str(callback.report)], reports
    assert fastlora.unpatch(model) == 0, "unpatch_at_end left patched layers"


# ----------------------------------------------------------------------------- SFTTrainer

@pytest.mark.parametrize("arch,checkpointing", [
    pytest.param("llama", True, marks=pytest.mark.quick), ("qwen2", True),
    pytest.param("llama", False, marks=pytest.mark.full("one more SFT run; checkpointing on "
                                                        "is TRL's default"))])
def test_sft_fp32_losses_agree(model_dirs, tokenizer, tmp_path, arch, checkpointing):
    """SFTTrainer with the callback vs without, fp32 compute (and adapter, fp32_adapter):
    per-step losses within the fp32 bound; the gradient norms TRL logs too."""
    plain, _ = sft_run(model_dirs[arch], tokenizer, tmp_path / "plain", False,
                       checkpointing=checkpointing)
    fused, callback = sft_run(model_dirs[arch], tokenizer, tmp_path / "fused", True,
                              checkpointing=checkpointing)
    assert_fused(callback)
    for key in ("loss", "grad_norm"):
        tm.assert_close_fp32(logged(fused, key), logged(plain, key), f"{arch} {key}")
    assert logged(fused, "loss")[-1] < logged(fused, "loss")[0], "training did not progress"


def test_sft_bf16_losses_within_bound(model_dirs, tokenizer, tmp_path):
    """bf16 compute (bf16=True, as QLoRA recipes run): the patched run's per-step losses are
    as close to the fp32 run as the unpatched bf16 run's, by fastlora.numerics' rule."""
    truth, _ = sft_run(model_dirs["llama"], tokenizer, tmp_path / "fp32", False)
    plain, _ = sft_run(model_dirs["llama"], tokenizer, tmp_path / "plain", False,
                       dtype=torch.bfloat16)
    fused, callback = sft_run(model_dirs["llama"], tokenizer, tmp_path / "fused", True,
                              dtype=torch.bfloat16)
    assert_fused(callback)
    numerics.assert_close("bf16 SFT losses", logged(fused, "loss"), logged(truth, "loss"),
                          logged(plain, "loss"), dtype=torch.bfloat16)


def test_sft_adapter_loads_into_plain_peft(model_dirs, tokenizer, tmp_path):
    """The adapter a patched SFT run saves is an ordinary PEFT adapter: loaded into an unpatched
    4-bit model it gives the trained model's logits unpatched, bit for bit; the patched
    model's logits are within fastlora.numerics' bound of the float64 truth."""
    from peft import PeftModel

    trainer, callback = sft_run(model_dirs["llama"], tokenizer, tmp_path / "run", True,
                                trl_adapter=True)
    trainer.save_model(str(tmp_path / "adapter"))
    model = trainer.model.eval()
    fused = tm.logits(model)
    assert fastlora.unpatch(model) == N_LAYERS
    unpatched = tm.logits(model)
    loaded = PeftModel.from_pretrained(
        tm.load_4bit(model_dirs["llama"], compute_dtype=torch.float32),
        str(tmp_path / "adapter")).eval()
    for name, param in loaded.named_parameters():  # as TRL trains QLoRA adapters: in bf16
        if "lora_" in name:                          # (PEFT loads them upcast to fp32)
            param.data = param.data.to(torch.bfloat16)
    again = tm.logits(loaded)
    assert torch.equal(again, unpatched), (again - unpatched).abs().max()
    # PEFT runs a bf16 adapter on bf16-rounded inputs, the fused op on the fp32 inputs: judged
    # against the float64 model by fastlora.numerics' rule, PEFT as the baseline
    truth = tm.logits(tm.float64_twin(model_dirs["llama"], model)).to(fused.device)
    numerics.assert_close("patched logits", fused, truth, unpatched, dtype=torch.float32)
    with loaded.disable_adapter():
        assert not torch.equal(again, tm.logits(loaded)), "the adapter is a no-op"


# ----------------------------------------------------------------------------- DPOTrainer

def dpo_run(model_dir, tokenizer, tmp_path, patched: bool):
    """DPOTrainer without a reference model: TRL takes the reference log-probabilities from the
    same model with the adapter disabled (those calls go to PEFT's forward: the base alone)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({"prompt": [f"question {i}:" for i in range(4)],
                              "chosen": [f" the answer is {i}" for i in range(4)],
                              "rejected": [f" no idea, {i}" for i in range(4)]})
    callback = fastlora.FastLoRACallback() if patched else None
    args = DPOConfig(**common_args(tmp_path, torch.float32, steps=2),  # step 2: adapter moved
                     per_device_train_batch_size=2, max_length=32)
    trainer = DPOTrainer(model=tm.load_4bit(model_dir, compute_dtype=torch.float32), args=args,
                         train_dataset=data, processing_class=tokenizer,
                         peft_config=lora_config(), callbacks=[callback] if patched else None)
    assert trainer.ref_model is None  # the adapter-disabled reference, not a copy
    fp32_adapter(trainer)
    trainer.train()
    return trainer, callback


def test_dpo_without_reference_model(model_dirs, tokenizer, tmp_path):
    """DPO losses and rewards (policy vs the adapter-disabled reference) of the patched run equal
    the unpatched run's within the fp32 bound, step by step."""
    plain, _ = dpo_run(model_dirs["qwen2"], tokenizer, tmp_path / "plain", False)
    fused, callback = dpo_run(model_dirs["qwen2"], tokenizer, tmp_path / "fused", True)
    assert_fused(callback)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
        tm.assert_close_fp32(logged(fused, key), logged(plain, key), f"DPO {key}")
    assert logged(fused, "rewards/margins").abs().max() > 0, "the adapter never moved"


# ----------------------------------------------------------------------------- GRPOTrainer

def grpo_run(model_dir, tokenizer, tmp_path, patched: bool):
    """GRPOTrainer, two steps of 4 sampled completions of one prompt, rewarded by how many 'e'
    they hold; returns (trainer, callback, completions, Triton launches by kernel)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    completions = []

    def reward_e(completions_in, **kwargs):
        completions.extend(completions_in)
        return [float(text.count("e")) for text in completions_in]

    def reward(completions, **kwargs):  # TRL passes completions by keyword
        return reward_e(completions, **kwargs)

    callback = fastlora.FastLoRACallback() if patched else None
    args = GRPOConfig(**common_args(tmp_path, torch.float32, steps=2),
                      per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, temperature=1.0)
    trainer = GRPOTrainer(model=tm.load_4bit(model_dir, compute_dtype=torch.float32),
                          reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["tell me: "] * 8}),
                          processing_class=tokenizer, peft_config=lora_config(),
                          callbacks=[callback] if patched else None)
    fp32_adapter(trainer)
    with counting(execute=True) as launches:
        trainer.train()
    return trainer, callback, completions, launches


@pytest.mark.skipif(not CPU, reason="CPU-only: counts interpreter launches")
def test_grpo_generates_through_the_small_m_path(model_dirs, tokenizer, tmp_path):
    """Generation (M = 4 sequences per decoding step) runs the fused small-M kernel; with the
    same seed both runs sample the same completions, and each step's loss, reward and gradient
    norm then match unpatched training within the fp32 bound."""
    plain, _, plain_texts, plain_launches = grpo_run(model_dirs["llama"], tokenizer,
                                                     tmp_path / "plain", False)
    fused, callback, texts, launches = grpo_run(model_dirs["llama"], tokenizer,
                                                tmp_path / "fused", True)
    assert_fused(callback)
    assert not plain_launches, plain_launches
    assert launches["_nf4_lora_fwd_small_m_kernel"] > 0, launches
    assert texts == plain_texts and len(texts) == 8, (texts, plain_texts)
    for key in ("loss", "reward", "grad_norm"):
        tm.assert_close_fp32(logged(fused, key), logged(plain, key), f"GRPO {key}")


# ----------------------------------------------------------------------------- Liger-Kernel

def liger_trainer(model_dir, tokenizer, tmp_path, patched: bool, dtype=torch.bfloat16):
    """SFTTrainer with use_liger_kernel=True: Liger's RMSNorm, SwiGLU MLP, RoPE and fused
    linear cross-entropy replace the modules around the LoRA layers."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    callback = fastlora.FastLoRACallback() if patched else None
    args = SFTConfig(**common_args(tmp_path, dtype), per_device_train_batch_size=2,
                     max_length=32, use_liger_kernel=True)
    trainer = SFTTrainer(model=tm.load_4bit(model_dir, compute_dtype=dtype), args=args,
                         train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer, peft_config=lora_config(),
                         callbacks=[callback] if patched else None)
    return trainer, callback


@pytest.fixture
def undo_liger():
    """Liger patches transformers' Llama and Qwen2 modules in place (their classes, functions and
    CausalLM forwards) for the whole process; put them back after the test, so later tests in
    this worker run transformers' own modules (Liger's kernels do not run in the interpreter)."""
    import importlib
    import inspect

    names = ["transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2"]
    modules = [importlib.import_module(name) for name in names]
    saved = [(module, dict(vars(module))) for module in modules]
    classes = [(cls, dict(vars(cls))) for module in modules
               for cls in vars(module).values()
               if inspect.isclass(cls) and cls.__module__ == module.__name__]
    yield
    for target, before in saved + classes:
        for key in set(vars(target)) - set(before):
            delattr(target, key)
        for key, value in before.items():
            if vars(target).get(key, object()) is not value:
                try:
                    setattr(target, key, value)
                except (AttributeError, TypeError):  # read-only slots such as __dict__
                    pass


class _StopBeforeTheFirstStep(Exception):
    pass


def stop_callback():
    """A callback that, added after FastLoRACallback, ends train() before its first step."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise _StopBeforeTheFirstStep
    return Stop()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_callback_patches_every_layer_under_liger(model_dirs, tokenizer, tmp_path, arch,
                                                   undo_liger):
    """trainer.train() applies Liger (norms, MLP forward, RoPE, loss replaced) and then runs
    on_train_begin, where the callback patches: it still finds and fuses every LoRA layer.
    Liger's kernels do not run in the CPU interpreter, so training stops before step 1."""
    pytest.importorskip("liger_kernel")
    trainer, callback = liger_trainer(model_dirs[arch], tokenizer, tmp_path, patched=True)
    trainer.add_callback(stop_callback())
    with pytest.raises(_StopBeforeTheFirstStep):
        trainer.train()
    names = {module._get_name() for module in trainer.model.modules()}
    assert "LigerRMSNorm" in names, "Liger did not replace the norms"
    report = callback.report
    assert report.patched == N_LAYERS and not report.skipped, report


@pytest.mark.cuda("Liger-Kernel's Triton kernels need a GPU")
def test_liger_training_losses_agree(model_dirs, tokenizer, tmp_path, undo_liger):
    """With Liger's kernels around the LoRA layers, bf16: the patched run's per-step losses are
    as close to an fp32 run without Liger as the unpatched Liger run's (fastlora.numerics)."""
    pytest.importorskip("liger_kernel")
    truth, _ = sft_run(model_dirs["llama"], tokenizer, tmp_path / "fp32", False)
    runs = {}
    for patched in (False, True):
        trainer, callback = liger_trainer(model_dirs["llama"], tokenizer,
                                          tmp_path / str(patched), patched)
        trainer.train()
        runs[patched] = trainer
    assert_fused(callback)
    numerics.assert_close("Liger bf16 SFT losses", logged(runs[True], "loss"),
                          logged(truth, "loss"), logged(runs[False], "loss"),
                          dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- the benchmark

@pytest.mark.skipif(not CPU, reason="CPU-only: the smoke pass (a GPU runs the timed benchmark)")
def test_bench_sft_mode_smoke(tmp_path, capsys):
    """`fastlora bench --modes sft` (the end-to-end row) without a GPU: both SFTTrainer runs
    complete, no timings are claimed, nothing is written as a GPU result."""
    from fastlora import cli

    code = cli.main(["bench", "--modes", "sft", "--no-compile-report", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "no GPU: smoke pass, no timings" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("fastlora ",
                                                                           "peft_bnb "))]
    assert [line[0] for line in lines] == ["fastlora", "peft_bnb"]
    assert all(line[1] == "0" and line[2] == "-" and line[-1] == "ok" for line in lines), lines
    assert not (tmp_path / "sft.csv").exists()
