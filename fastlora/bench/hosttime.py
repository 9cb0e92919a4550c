"""`fastlora bench --modes host`: the host (Python) time of one LoRA layer call at generation
sizes, fastlora's patched layer next to PEFT's own, with the GPU work taken out (issue 29).

At M <= 16 a layer's GPU work is a few microseconds, so what the host spends reaching the
launch counts. Measured here, on whatever machine runs it (the CPU included: no GPU time is
involved):
    fastlora   a PEFT LoRA layer over a bitsandbytes 4-bit base after fastlora.patch, from the
               module call to its Triton launches, every launch replaced by a recorder
               (`recorded_launches`: the runtime's run(), where Triton binds the arguments
               and launches, so that binding is left out; on a GPU the autotuner's lookup
               before it stays in);
    peft_bnb   the same layer unpatched, bitsandbytes' 4-bit product (bnb.matmul_4bit)
               and dequantization replaced by recorders that return an empty output; PEFT's
               LoRA matmuls (and DoRA's norm) run (on a GPU: their launches). bitsandbytes'
               own dispatch to its kernel is left out, so this is a lower bound of PEFT's
               host time.
A second row times PEFT's DoRA layer (use_dora=True) the same way; a third a mixed batch
(three adapters, PEFT's adapter_names: MIXED_NAMES, one token per sample, M = 4); a fourth a
whole decode step of fastlora.demo's small 4-bit Llama (one token; patched with groups),
launches counted per decoder layer (measure_decode_step).
At M = 1 (generation's decode step), both under torch.no_grad, eval mode, one warm call
first (compiling, autotuning and the fused/dequantize pick happen there, with real
launches). The layer is small (K = N =
256, r = 16) so that PEFT's real LoRA matmuls cost next to nothing on a CPU; host time does
not depend on the shape. Reported: microseconds per call (best of 5 rounds of ROUNDS calls)
and launches per call.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import torch

from . import report

K = N = 256
RANK = 16
ROUNDS = 300
MS = (1,)  # at M = 16 PEFT's real LoRA matmuls already cost CPU time a GPU would not
PROVIDERS = ("fastlora", "peft_bnb")
MIXED_NAMES = ["default", "a1", "__base__", "a2"]  # one adapter name per sample
_COLUMNS = [("provider", "provider"), ("what", "call"), ("us_per_call", "host us / call"),
            ("launches", "Triton launches / call (a step: / decoder layer)"),
            ("vs_peft", "x of PEFT")]


@contextlib.contextmanager
def recorded_launches(execute: bool = False):
    """Count Triton kernel launches by kernel name where the runtime runs them (compiled:
    JITFunction.run; interpreter: InterpretedFunction.run); execute=False records instead of
    running them. Yields the Counter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from .. import interpreter

    interpreter.apply()
    counts = collections.Counter()
    real = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def recorder(cls):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                counts[self.fn.__name__] += 1
            if execute:
                return real[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            return None
        return run
    for cls in real:
        cls.run = recorder(cls)
    try:
        yield counts
    finally:
        for cls, run in real.items():
            cls.run = run


@contextlib.contextmanager
def recorded_bnb_product():
    """bitsandbytes' 4-bit product (bnb.matmul_4bit, what its Linear4bit calls) and its
    dequantization (bnb.functional.dequantize_4bit, what PEFT's DoRA calls for the weight
    norm) replaced by recorders returning an empty output of the right shape; yields the
    product's call count (a list)."""
    import bitsandbytes as bnb

    real, real_deq, calls = bnb.matmul_4bit, bnb.functional.dequantize_4bit, []

    def recorder(A, B, quant_state=None, out=None, bias=None):
        calls.append(1)
        return torch.empty(*A.shape[:-1], quant_state.shape[0], dtype=A.dtype, device=A.device)

    def dequantize(A, quant_state=None, *args, **kwargs):
        return torch.empty(*quant_state.shape, dtype=quant_state.dtype, device=A.device)
    bnb.matmul_4bit, bnb.functional.dequantize_4bit = recorder, dequantize
    try:
        yield calls
    finally:
        bnb.matmul_4bit, bnb.functional.dequantize_4bit = real, real_deq


def layer(device: str, dtype: torch.dtype = torch.bfloat16, dora: bool = False,
          adapters: int = 1):
    """A PEFT LoRA layer (r = RANK, lora_B non-zero; with `dora`, PEFT's DoRA) over a
    bitsandbytes NF4 Linear4bit [N, K] on `device`, in eval mode; inside a parent module, as
    PEFT's layers are. adapters > 1: that many ("default", "a1", ...), "default" active."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
    base = torch.nn.Sequential(bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype,
                                                 quant_type="nf4"))
    base[0].weight = bnb.nn.Params4bit(dense[0].weight.data.to(dtype), requires_grad=False,
                                       quant_type="nf4")
    base = base.to(device)
    base[0].support_avx512bf16_for_cpu = False  # keep bnb's CPU repack off (tiny_models)
    base.is_loaded_in_4bit = True  # what PEFT reads to wrap a Linear4bit as its lora.Linear4bit
    def config():
        return LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["0"], use_dora=dora)
    model = get_peft_model(base, config())
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config())
    with torch.no_grad():
        for lora_B in model.base_model.model[0].lora_B.values():
            lora_B.weight.normal_(0, 0.05)
    return model.eval(), model.base_model.model[0]


def _per_call_us(fn) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(ROUNDS):
            fn()
        best = min(best, (time.perf_counter() - start) / ROUNDS)
    return best * 1e6


def measure(device: str, m: int, dtype: torch.dtype = torch.bfloat16,
            dora: bool = False, names: list | None = None) -> dict:
    """{provider: (us per call, launches per call)} at M = m (see the module doc); `dora`:
    PEFT's DoRA layer, whose call also makes the weight norm (PEFT: from the dequantized
    weight, the dequantization recorded, its own small torch ops run; fastlora: once, when
    the call is prepared); `names`: a mixed batch, one sample of m tokens per adapter name
    (PEFT: the base product once, then each adapter's gather, matmuls and scatter)."""
    import fastlora

    model, lora_layer = layer(device, dtype, dora,
                              adapters=len({n for n in names or () if n != "__base__"}) or 1)
    x = torch.randn(len(names or (1,)), m, K, dtype=dtype, device=device)
    kwargs = {"adapter_names": names} if names else {}

    def call():
        return lora_layer(x, **kwargs)
    out = {}
    with torch.no_grad():
        call()  # warm: bnb's own first call
        with recorded_bnb_product() as calls:
            us = _per_call_us(call)
        if not calls:
            raise RuntimeError("bnb.matmul_4bit was not called: the PEFT layer did not run "
                               "bitsandbytes' product, so nothing of it was measured")
        out["peft_bnb"] = (us, 0.0)
        fastlora.patch(model)
        call()  # warm: compile, autotune, the fused/dequantize pick, with real launches
        with recorded_launches() as counts:
            us = _per_call_us(call)
        out["fastlora"] = (us, sum(counts.values()) / (5 * ROUNDS))
        fastlora.unpatch(model)
    return out


def measure_decode_step(device: str) -> dict:
    """{provider: (us per call, Triton launches per decoder layer)} of a whole decode step
    (M = 1: one token) of fastlora.demo's small 4-bit Llama with LoRA on its seven
    projections, patched (q/k/v and gate/up grouped) or not, launches and bitsandbytes'
    product recorded as in measure(). Both sides run the same non-LoRA modules (embedding,
    norms, attention, head), so the difference is the LoRA layers' host time."""
    import tempfile

    import fastlora
    from .. import demo

    with tempfile.TemporaryDirectory() as out:
        cfg = demo.make_config("cpu", out)
    model = demo.add_lora(demo.build_4bit_model(cfg, device), cfg).eval()
    for module in model.modules():  # keep bitsandbytes' CPU repack off, as layer() does
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    out = {}
    with torch.no_grad():
        model(ids)
        with recorded_bnb_product() as calls:
            us = _per_call_us(lambda: model(ids))
        if not calls:
            raise RuntimeError("bnb.matmul_4bit was not called in PEFT's decode step")
        out["peft_bnb"] = (us, 0.0)
        fastlora.patch(model, group=True)
        for _ in range(3):  # learn and form the groups, prepare the calls
            model(ids)
        with recorded_launches() as counts:
            us = _per_call_us(lambda: model(ids))
        out["fastlora"] = (us, sum(counts.values()) / (5 * ROUNDS) / cfg.layers)
        fastlora.unpatch(model)
    return out


def rows(device: str) -> list[dict]:
    table = []
    for what, got in [(f"layer, M = {m}", measure(device, m)) for m in MS] \
            + [("DoRA layer, M = 1", measure(device, 1, dora=True)),
               (f"mixed batch, 3 adapters, M = {len(MIXED_NAMES)}",
                measure(device, 1, names=MIXED_NAMES)),
               ("decode step (M = 1)", measure_decode_step(device))]:
        for provider in PROVIDERS:
            us, launches = got[provider]
            table.append({"provider": provider, "what": what, "us_per_call": us,
                          "launches": launches, "vs_peft": us / got["peft_bnb"][0]})
    return table


def run(opts) -> int:
    """The host-time table on this machine (GPU or CPU); returns the exit code."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.say(f"\n== host: Python time of one LoRA layer call (K = N = {K}, r = {RANK}, bf16, "
             f"no grad) on {device}, GPU work recorded not run ==")
    table = rows(device)
    opts.say(report.text_table(table, _COLUMNS))
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "host.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# Host time per layer call ({device})\n\n"
                 + report.markdown_table(table, _COLUMNS) + "\n")
    return 0
