"""`fastlora bench --modes sft`: end to end, TRL's SFTTrainer on a small Llama in 4 bits, with
fastlora (fastlora.FastLoRACallback) and without it (PEFT + bitsandbytes), issue 32.

The model is the demo's (fastlora.demo.build_4bit_model: a random Llama from a config, NF4 with
double quantisation, LoRA on all seven projections), trained on the demo's byte corpus through
SFTTrainer with TRL's defaults otherwise (gradient checkpointing on, AdamW). Both runs see the
same seed, the same rows and the same number of steps.

On a GPU: steps per second and tokens per second over the steps after WARMUP_STEPS (a callback
synchronises and reads the clock at each step's end), peak memory, the first and last loss,
and fastlora's speedup; appended to sft.csv, written to sft.md. Without one: a smoke pass of
two steps of the CPU preset (the kernels in the interpreter): both runs complete, their losses
and the largest per-step difference are printed; no timings (CPU time says nothing about GPU
speed). The per-step agreement itself is tested (tests/test_trl.py).
"""

from __future__ import annotations

import math
import os
import time

import torch

from . import report

PROVIDERS = ("fastlora", "peft_bnb")  # with FastLoRACallback / without
WARMUP_STEPS = 3  # compiling and autotuning happen here; not timed
# the GPU run: a small Llama (4 layers, width 1024), 8 x 512 tokens a step
GPU_MODEL = dict(hidden=1024, layers=4, heads=16, rank=16, batch_size=8, seq_len=512, steps=23,
                 lr=1e-4)
SMOKE_MODEL = dict(batch_size=2, seq_len=16, steps=2)  # on the CPU preset's model
_COLUMNS = [("provider", "provider"), ("steps", "timed steps"), ("steps_per_s", "steps/s"),
            ("tokens_per_s", "tokens/s"), ("speedup", "speedup vs PEFT"),
            ("peak_mib", "peak MiB"), ("first_loss", "first loss"), ("last_loss", "last loss"),
            ("status", "status")]


def _step_clock():
    """A TrainerCallback reading the clock (after a CUDA sync) at every step's end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
    return StepClock()


def train_once(cfg, device: str, patched: bool) -> dict:
    """One SFTTrainer run of cfg.steps steps; its row (timings over the steps after
    WARMUP_STEPS when there are at least two of them)."""
    import fastlora
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ..demo import (batch, build_4bit_model, byte_tokenizer, lora_config, load_corpus,
                        split_corpus)

    train_data, _ = split_corpus(load_corpus())
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = torch.cat([batch(train_data, cfg, gen, "cpu") for _ in range(cfg.steps)])
    clock = _step_clock()
    callbacks = [clock] + ([fastlora.FastLoRACallback(require_patched=True)] if patched else [])
    args = SFTConfig(output_dir=os.path.join(cfg.out, "sft-" + PROVIDERS[not patched]),
                     max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                     learning_rate=cfg.lr, logging_steps=1, report_to=[], save_strategy="no",
                     seed=cfg.seed, use_cpu=device == "cpu",
                     bf16=cfg.dtype == torch.bfloat16, fp16=cfg.dtype == torch.float16,
                     max_length=cfg.seq_len, dataloader_num_workers=0, disable_tqdm=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=build_4bit_model(cfg, device), args=args,
                         processing_class=byte_tokenizer(), peft_config=lora_config(cfg),
                         train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
                         callbacks=callbacks)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = clock.times[WARMUP_STEPS - 1:]
    row = {"provider": PROVIDERS[not patched], "steps": max(0, len(timed) - 1),
           "steps_per_s": math.nan, "tokens_per_s": math.nan, "speedup": math.nan,
           "peak_mib": math.nan, "first_loss": losses[0], "last_loss": losses[-1],
           "status": "ok"}
    if device == "cuda" and len(timed) >= 2:
        row["steps_per_s"] = (len(timed) - 1) / (timed[-1] - timed[0])
        row["tokens_per_s"] = row["steps_per_s"] * cfg.batch_size * cfg.seq_len
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    row["losses"] = losses
    return row


def run(opts) -> int:
    """The SFT benchmark on a GPU, else its smoke pass; returns the exit code."""
    from ..demo import make_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = GPU_MODEL if device == "cuda" else SMOKE_MODEL
    cfg = make_config(device, opts.out, **sizes)
    opts.say(f"\n== sft: TRL SFTTrainer, Llama {cfg.layers} layers x {cfg.hidden} in 4 bits, "
             f"LoRA r={cfg.rank}, {cfg.batch_size} x {cfg.seq_len} tokens a step, {cfg.steps} "
             "steps" + ("" if device == "cuda" else " (no GPU: smoke pass, no timings)")
             + " ==")
    rows = []
    for patched in (True, False):
        try:
            rows.append(train_once(cfg, device, patched))
        except Exception as exc:  # one provider failing must not stop the other
            rows.append({"provider": PROVIDERS[not patched], "steps": 0,
                         "steps_per_s": math.nan, "tokens_per_s": math.nan,
                         "speedup": math.nan, "peak_mib": math.nan, "first_loss": math.nan,
                         "last_loss": math.nan, "status": f"error: {type(exc).__name__}: {exc}",
                         "losses": []})
    fused, peft = rows
    if device == "cuda":
        fused["speedup"] = fused["steps_per_s"] / peft["steps_per_s"]
        peft["speedup"] = 1.0
    code = int(any(row["status"] != "ok" for row in rows))
    if not code and len(fused["losses"]) == len(peft["losses"]):
        # bf16 training of the same model on the same rows: the curves agree to bf16 rounding
        drift = max(abs(a - b) / abs(b) for a, b in zip(fused["losses"], peft["losses"]))
        opts.say(f"largest per-step loss difference, fastlora vs PEFT: {drift:.2%}")
    table = [{key: row[key] for key, _ in _COLUMNS} for row in rows]
    opts.say(report.text_table(table, _COLUMNS))
    os.makedirs(opts.out, exist_ok=True)
    if device == "cuda":
        env = report.environment(torch.cuda.get_device_name())
        report.append_csv(os.path.join(opts.out, "sft.csv"), [{**env, **r} for r in table])
        with open(os.path.join(opts.out, "sft.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# TRL SFTTrainer steps/s ({env['gpu']})\n\n"
                     + report.markdown_table(table, _COLUMNS) + "\n")
    return code
