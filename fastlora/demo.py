"""`fastlora demo`: the main job, end to end, with nothing downloaded.

1. Build a small Llama-architecture model from a config (random weights), save it, and load it
   back in 4 bits through transformers + bitsandbytes (NF4, double quantisation), the way a
   QLoRA user loads a real checkpoint.
2. Wrap it with PEFT LoRA on every projection, then fastlora.patch() it: the LoRA layers now
   run the fused kernels (compiled on a GPU; in Triton's interpreter, or the PyTorch reference,
   on a CPU - the demo says which).
3. Fine-tune the LoRA weights on the corpus shipped in fastlora/data (byte-level tokens: the
   256 byte values are the vocabulary) for a fixed number of steps under autocast, printing
   loss, tokens/s and peak memory, and write the loss curve (loss.png, loss.csv).
4. Check: the patched model's logits on a held-out batch, by fastlora.numerics' rule: error vs
   the same model in float64 at most 2x that of the same model unpatched (PEFT + bitsandbytes
   as users run it today) + one ulp. A run where fastlora.patch fused nothing stops before
   training (DemoError): it would compare PEFT with itself.
With --trl (fastlora[trl] installed), between 3 and 4 the same fine-tuning also runs through
TRL's SFTTrainer on a fresh model, fastlora switched on by fastlora.FastLoRACallback; both
loss curves go into loss.png and loss.csv.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    steps: int
    out: str
    batch_size: int
    seq_len: int
    rank: int
    hidden: int           # a multiple of 64, so quantisation blocks never straddle rows
    layers: int           # (bitsandbytes 0.50's CPU dequantize mis-scales those)
    heads: int
    seed: int = 0
    lr: float = 1e-2
    dtype: torch.dtype = torch.bfloat16
    trl: bool = False     # also fine-tune through TRL's SFTTrainer with FastLoRACallback

    @property
    def intermediate(self) -> int:
        return 2 * self.hidden


# Defaults per device. The CPU preset is sized so that the kernels, running in Triton's
# interpreter (whose cost is per 32x32 tile), finish inside 3 minutes on 2 cores.
PRESETS = {
    "cuda": dict(steps=200, batch_size=16, seq_len=256, rank=16, hidden=512, layers=4, heads=8,
                 lr=5e-3),
    "cpu": dict(steps=16, batch_size=4, seq_len=32, rank=8, hidden=64, layers=2, heads=4),
}


def make_config(device: str, out: str, **overrides) -> DemoConfig:
    """The device's preset with the given (non-None) overrides."""
    values = {**PRESETS[device], **{k: v for k, v in overrides.items() if v is not None}}
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        values["dtype"] = torch.float16
    cfg = DemoConfig(out=out, **values)
    if cfg.hidden % 64:
        raise ValueError(f"--hidden must be a multiple of 64, got {cfg.hidden}")
    if cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
        raise ValueError(f"--hidden ({cfg.hidden}) must split into --heads ({cfg.heads}) heads "
                         "of an even size")
    if cfg.rank > cfg.hidden:
        raise ValueError(f"--rank ({cfg.rank}) must not exceed --hidden ({cfg.hidden})")
    if cfg.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {cfg.seq_len}")
    # a window of seq_len bytes needs seq_len + 1 bytes (batch draws its start below
    # numel - seq_len); the held-out slice, the smaller part, bounds it
    longest = min(part.numel() for part in split_corpus(load_corpus())) - 1
    if cfg.seq_len > longest:
        raise ValueError(f"--seq-len must be <= {longest} (the shipped corpus' held-out part "
                         f"is {longest + 1} bytes), got {cfg.seq_len}")
    # torch.manual_seed takes 64 bits; the check batch uses seed + 1
    if not 0 <= cfg.seed < 2**63:
        raise ValueError(f"--seed must be in 0..2**63-1, got {cfg.seed}")
    return cfg


class DemoError(RuntimeError):
    """The demo cannot make its point (e.g. fastlora.patch fused no layer): the CLI reports it
    as one line and exits with 1."""


def load_corpus() -> torch.Tensor:
    """The shipped corpus as byte ids (int64)."""
    text = resources.files("fastlora").joinpath("data/corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def split_corpus(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes for the check): the last tenth is held out."""
    held_out = data.numel() // 10
    return data[:-held_out], data[-held_out:]


def build_4bit_model(cfg: DemoConfig, device: str):
    """A random Llama from a config, saved to a temporary folder and re-loaded in 4 bits
    (NF4, double quantisation, compute dtype cfg.dtype) through transformers + bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden,
                         intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads // 2 if cfg.heads % 2 == 0 else cfg.heads,
                         max_position_embeddings=cfg.seq_len, tie_word_embeddings=False,
                         # 0.1, not 0.02: logits of a random model initialised at 0.02 stay
                         # within ~1, so LoRA alone can barely move the loss off ln(256)
                         initializer_range=0.1)
    torch.manual_seed(cfg.seed)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=cfg.dtype)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                    device_map={"": device}, dtype=cfg.dtype)


def lora_config(cfg: DemoConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.05,
                      target_modules=TARGET_MODULES, task_type="CAUSAL_LM")


def add_lora(model, cfg: DemoConfig):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def batch(data: torch.Tensor, cfg: DemoConfig, gen: torch.Generator, device: str):
    """`batch_size` random windows of seq_len bytes."""
    starts = torch.randint(0, data.numel() - cfg.seq_len, (cfg.batch_size,), generator=gen)
    return torch.stack([data[s:s + cfg.seq_len] for s in starts.tolist()]).to(device)


def peak_memory(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.1f} MiB GPU memory allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 1024:.0f} MiB peak RSS of the whole process (CPU)"


def train(model, data, cfg: DemoConfig, device: str) -> tuple[list[float], float]:
    """cfg.steps AdamW steps on the LoRA weights; returns (losses, tokens/s after step 1, None
    when there is only one step)."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses, start = [], None
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        ids = batch(data, cfg, gen, device)
        with torch.autocast(device, dtype=cfg.dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step == 0:  # step 1 compiles / warms up: tokens/s counts the steps after it
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    timed_steps = cfg.steps - 1
    elapsed = time.perf_counter() - start
    tokens_per_s = timed_steps * cfg.batch_size * cfg.seq_len / elapsed if timed_steps else None
    return losses, tokens_per_s


def train_with_trl(data: torch.Tensor, cfg: DemoConfig, device: str, say) -> list[float]:
    """The same fine-tuning through TRL's SFTTrainer: a fresh 4-bit model of the same seed, TRL
    building the PEFT model from the demo's LoRA config, fastlora switched on by
    FastLoRACallback, AdamW at cfg.lr (torch's default weight decay, as `train`) over the same
    number of steps of the byte windows `train` draws (given to TRL already tokenized, in the
    trainer's own shuffled order). Returns the per-step losses."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise DemoError(f"--trl needs TRL (pip install fastlora[trl]): {exc}") from None
    import fastlora

    gen = torch.Generator().manual_seed(cfg.seed)
    rows = torch.cat([batch(data, cfg, gen, "cpu") for _ in range(cfg.steps)])
    callback = fastlora.FastLoRACallback(require_patched=True)
    args = SFTConfig(output_dir=os.path.join(cfg.out, "trl"), max_steps=cfg.steps,
                     per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                     logging_steps=1, report_to=[], save_strategy="no", seed=cfg.seed,
                     use_cpu=device == "cpu", bf16=cfg.dtype == torch.bfloat16,
                     fp16=cfg.dtype == torch.float16, gradient_checkpointing=False,
                     max_length=cfg.seq_len, dataloader_num_workers=0, disable_tqdm=False)
    model = build_4bit_model(cfg, device)
    trainer = SFTTrainer(model=model, args=args, processing_class=byte_tokenizer(),
                         train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
                         peft_config=lora_config(cfg), callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    say(f"TRL SFTTrainer with fastlora.FastLoRACallback ({callback.report.patched} layers "
        f"fused): {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses


def write_loss_curve(curves: dict[str, list[float]], path: str, title: str) -> None:
    """Each curve (label -> per-step losses) on one plot; long curves also get a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, losses in curves.items():
        steps = range(1, len(losses) + 1)
        window = max(1, len(losses) // 10)
        smooth = []
        for i in range(len(losses)):
            recent = losses[max(0, i - window + 1):i + 1]
            smooth.append(sum(recent) / len(recent))
        line, = ax.plot(steps, losses, lw=0.8 if window > 1 else 1.6,
                        alpha=0.5 if window > 1 else 1.0, marker=None if window > 1 else ".",
                        label=label)
        if window > 1:
            ax.plot(steps, smooth, lw=1.6, color=line.get_color(),
                    label=f"{label}, mean of last {window}")
    ax.axhline(math.log(256), color="gray", ls="--", lw=0.8, label="uniform over 256 bytes")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def float64_twin(model):
    """The PEFT model `model` in float64, the truth fastlora.numerics measures a run against:
    the same config, each 4-bit weight decoded exactly (bitsandbytes' own dequantize in
    float32, exact in float64), every other weight (fp16/bf16/fp32 values, exact in float64)
    and the active adapter copied, under PEFT's plain LoRA layers. Eval mode."""
    import copy

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    inner = model.get_base_model()
    config = copy.deepcopy(inner.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float64).to(model.device)
    with torch.no_grad():
        for name, module in dense.named_modules():
            source = inner.get_submodule(name)
            source = source.get_base_layer() if hasattr(source, "get_base_layer") else source
            for key, param in module.named_parameters(recurse=False):
                value = getattr(source, key)
                if isinstance(source, bnb.nn.Linear4bit) and key == "weight":
                    state = copy.copy(value.quant_state)
                    state.dtype = torch.float32
                    value = bnbF.dequantize_4bit(value.data, state)
                param.copy_(value.double())
    adapter = model.active_adapter
    twin = get_peft_model(dense, copy.deepcopy(model.peft_config[adapter]))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, adapter_name=adapter,
                                                              save_embedding_layers=False))
    return twin.double().eval()


def check_patched(model, ids: torch.Tensor, cfg: DemoConfig, device: str, say) -> bool:
    """Logits of the patched model on one held-out batch (eval mode), held to the project's
    rule (fastlora.numerics, the one every kernel test uses): error vs a float64 truth (the
    same model in float64) <= 2 x the error of the same model unpatched (PEFT + bitsandbytes,
    plain PyTorch in the same dtype) + one ulp of the logits' scale. Inputs require grad, as in
    training, so bitsandbytes takes its training path (on a CPU its no-grad eval path repacks
    the weight and rounds absmax to bf16, a different computation)."""
    import fastlora
    from fastlora.numerics import compare

    twin = float64_twin(model)  # before any eval forward: bnb must not have repacked yet
    model.eval()
    model.enable_input_require_grads()

    def logits_and_loss():
        with torch.enable_grad(), torch.autocast(device, dtype=cfg.dtype):
            result = model(input_ids=ids, labels=ids)
        return result.logits.detach().float(), result.loss.detach().item()

    patched, loss_p = logits_and_loss()
    restored = fastlora.unpatch(model)
    unpatched, loss_u = logits_and_loss()
    with torch.no_grad():
        truth = twin(input_ids=ids).logits
    del twin
    result = compare("logits", patched, truth, unpatched, cfg.dtype)
    agree = float((patched.argmax(-1) == unpatched.argmax(-1)).float().mean())
    say(f"check on a held-out batch ({restored} layers unpatched for the comparison), "
        f"logits vs the same model in float64: max error patched {result.max_err:.3e}, "
        f"unpatched {result.baseline_err:.3e}; bound 2 x unpatched + 1 ulp = "
        f"{result.bound:.3e}; next-byte argmax agreement {agree:.1%}; loss {loss_p:.4f} "
        f"patched vs {loss_u:.4f} unpatched -> {'OK' if result.ok else 'MISMATCH'}")
    if not result.ok:
        say(result.message())
    return result.ok


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> int:
    """The whole demo; returns the exit code (1 when the patched/unpatched check fails)."""
    import fastlora
    from fastlora import backend
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say(f"fastlora demo: {backend.describe(device)}")
    train_data, check_data = split_corpus(load_corpus())
    model = add_lora(build_4bit_model(cfg, device), cfg)
    report = fastlora.patch(model)
    skipped = {reason: len(names) for reason, names in report.skipped.items()}
    say(f"model: Llama, {cfg.layers} layers, hidden {cfg.hidden}, intermediate "
        f"{cfg.intermediate}, vocab 256 bytes; 4-bit NF4 base, LoRA r={cfg.rank} on "
        f"{', '.join(TARGET_MODULES)}; fastlora.patch: {report.patched} layers fused"
        + (f", skipped {skipped}" if skipped else ""))
    if not report.patched:  # the check would compare PEFT with itself
        raise DemoError("fastlora.patch fused no layer (skipped: "
                        + "; ".join(f"{n} x {reason}" for reason, n in skipped.items())
                        + "): nothing to demonstrate")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, tokens_per_s = train(model, train_data, cfg, device)
    say(f"trained {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens: loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}; "
        + (f"{tokens_per_s:,.0f} tokens/s (steps 2..N); " if tokens_per_s else
           "tokens/s: needs 2+ steps (step 1 is warm-up); ") +
        f"peak memory: {peak_memory(device)}")
    columns = {"loss": losses}  # loss.csv column -> per-step losses
    if cfg.trl:
        columns["trl_sft_loss"] = train_with_trl(train_data, cfg, device, say)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "loss.csv"), "w", encoding="utf-8") as fh:
        fh.write(",".join(["step", *columns]) + "\n")
        fh.write("".join(",".join(map(str, [i + 1, *(c[i] for c in columns.values())])) + "\n"
                         for i in range(len(losses))))
    labels = {"loss": "fastlora.patch, the demo's loop" if cfg.trl else "loss",
              "trl_sft_loss": "TRL SFTTrainer + FastLoRACallback"}
    write_loss_curve({labels[name]: values for name, values in columns.items()},
                     os.path.join(cfg.out, "loss.png"),
                     f"fastlora demo: QLoRA on a tiny Llama\n{backend.describe(device)}")
    say(f"wrote loss.png and loss.csv to {cfg.out}")
    ids = batch(check_data, cfg, torch.Generator().manual_seed(cfg.seed + 1), device)
    return 0 if check_patched(model, ids, cfg, device, say) else 1


def byte_tokenizer():
    """A byte-level tokenizer built in-process (nothing downloaded): the 256 byte values, in
    the order of their byte-level characters, then <|pad|> (256) and <|eos|> (257). What a
    transformers Trainer or TRL trainer needs as `processing_class` for the byte corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|pad|>": 256, "<|eos|>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>",
                                   eos_token="<|eos|>", bos_token="<|eos|>")
