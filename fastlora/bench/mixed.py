"""`fastlora bench --modes mixed`: several adapters in one batch over one 4-bit base (issue 14),
per layer shape, 1, 4 and 16 adapters of the bench rank, tokens spread evenly.

Providers, each on the same bitsandbytes-quantised weight and bias (opts.case):
    fastlora        one adapter over the whole batch (fastlora.lora_linear_4bit): what the
                    mixed batch is measured against (the goal: within 1.2x at 16 adapters and
                    M = 4096)
    fastlora_mixed  fastlora.mixed_linear_4bit, row m routed to adapter m % G
    peft_mixed_bnb  PEFT's Linear4bit with G adapters, called with adapter_names
                    (its _mixed_batch_forward: the base once, then per adapter a gather of its
                    rows, two matmuls and a scatter-add)
    one_at_a_time   each adapter's rows through their own fastlora.lora_linear_4bit call
Modes: mixed_forward and mixed_full (forward + backward). Dropout 0.

On a GPU: median ms (triton.testing.do_bench, L2 flushed, inputs rotating), "x of one
adapter" (this / fastlora), to mixed.csv (appended) and mixed.md. Without one: a smoke pass
on a tiny layer (kernels in the interpreter; fastlora_mixed and PEFT's mixed batch against the
float64 reference.mixed_linear_4bit) and a MODELLED table (mixed_modelled.md).
"""

from __future__ import annotations

import itertools
import math
import os

import torch

from . import model, report, shapes as shape_table
from .block import block_callable, inputs, time_providers, write_measured
from .peaks import peak_named
from .timing import copies_needed

PROVIDERS = ("fastlora", "fastlora_mixed", "peft_mixed_bnb", "one_at_a_time")
MODES = ("mixed_forward", "mixed_full")
ADAPTER_COUNTS = (1, 4, 16)
SINGLE = "fastlora"
_COLUMNS = [("shape", "shape"), ("m", "M"), ("rank", "r"), ("adapters", "adapters"),
            ("mode", "mode"), ("provider", "provider"), ("median_ms", "median ms"),
            ("vs_single", "x of one adapter"), ("status", "status")]
_MODELLED_COLUMNS = [("gpu", "GPU"), ("shape", "shape"), ("m", "M"), ("rank", "r"),
                     ("adapters", "adapters"), ("mode", "mode"),
                     *[(p, f"{p} us") for p in PROVIDERS],
                     ("vs_single", "mixed x of one adapter"),
                     ("vs_peft", "PEFT mixed / fastlora mixed")]
_SMOKE_COLUMNS = [("provider", "provider"), ("worst", "worst"), ("max_err", "max err"),
                  ("bound", "bound"), ("status", "status")]


def adapters_for(case, count: int) -> list:
    """`count` MixedAdapters of the case's rank (A, B drawn per adapter; scalings 1, 2, ...)."""
    from ..checks import MixedAdapter

    n, k = case.state.shape
    rank = case.lora_A.shape[0]
    g = torch.Generator().manual_seed(11)
    dev, dt = case.lora_A.device, case.lora_A.dtype
    return [MixedAdapter((torch.randn(rank, k, generator=g) / k**0.5).to(dev, dt),
                         (torch.randn(n, rank, generator=g) / rank**0.5).to(dev, dt),
                         float(1 + i % 4)) for i in range(count)]


def build(provider: str, case, adapters: list, m: int) -> tuple:
    """(fn(x) -> [y], trainable leaves) of a provider; rows routed round-robin."""
    import fastlora

    count = len(adapters)
    rows = torch.arange(m, device=case.x.device) % count
    if provider == "peft_mixed_bnb":
        from .providers import peft_bnb_layer

        layer = peft_bnb_layer(case, adapters=adapters)
        names = [f"a{int(i)}" for i in rows.tolist()]
        params = [t for g in range(count) for t in (layer.lora_A[f"a{g}"].weight,
                                                    layer.lora_B[f"a{g}"].weight)]
        return (lambda x: [layer(x, adapter_names=names)]), params
    leaves = [a._replace(lora_A=a.lora_A.detach().clone().requires_grad_(True),
                         lora_B=a.lora_B.detach().clone().requires_grad_(True))
              for a in adapters]
    params = [t for a in leaves for t in (a.lora_A, a.lora_B)]
    if provider == SINGLE:
        a = leaves[0]
        return (lambda x: [fastlora.lora_linear_4bit(x, case.packed, case.state, a.lora_A,
                                                     a.lora_B, a.scaling, case.bias)]), params[:2]
    if provider == "fastlora_mixed":
        return (lambda x: [fastlora.mixed_linear_4bit(x, case.packed, case.state, leaves, rows,
                                                      case.bias)]), params
    if provider == "one_at_a_time":
        picks = [torch.nonzero(rows == g).squeeze(1) for g in range(count)]

        def one_by_one(x):
            y = x.new_empty(x.shape[0], case.state.shape[0])
            parts = [fastlora.lora_linear_4bit(x[idx], case.packed, case.state, a.lora_A,
                                               a.lora_B, a.scaling, case.bias)
                     for a, idx in zip(leaves, picks)]
            return [y.index_copy(0, torch.cat(picks), torch.cat(parts))]
        return one_by_one, params
    raise ValueError(f"unknown mixed provider {provider!r}: choose from {', '.join(PROVIDERS)}")


def _block_mode(mode: str) -> str:
    return {"mixed_forward": "block_forward", "mixed_full": "block_full"}[mode]


def run(opts) -> int:
    """The mixed-batch benchmark on a GPU, else its smoke pass and modelled table."""
    if torch.cuda.is_available():
        return _run_gpu(opts)
    code = _run_smoke(opts)
    run_modelled(opts)
    return code


def _run_gpu(opts) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    rows, failed = [], False
    dtype = opts.torch_dtype
    elt = torch.finfo(dtype).bits // 8
    for shape, m, rank, count, mode in itertools.product(opts.shapes, opts.ms, opts.ranks,
                                                         ADAPTER_COUNTS, MODES):
        case = opts.case(m, shape, rank)
        adapters = adapters_for(case, count)
        xs, dyss = inputs([case], m, dtype, copies_needed(m * (shape.k + shape.n) * elt, l2))
        mine, times, bad = time_providers(
            opts, PROVIDERS, lambda provider: build(provider, case, adapters, m),
            _block_mode(mode), xs, dyss,
            {"shape": shape.name, "m": m, "rank": rank, "adapters": count})
        for row in mine:
            row["mode"] = mode
            row["vs_single"] = row["median_ms"] / times.get(SINGLE, math.nan)
        rows += mine
        failed |= bad
    write_measured(opts, rows, _COLUMNS, "mixed", "mixed batch")
    return 1 if failed else 0


def _run_smoke(opts) -> int:
    from ..cases import mixed_reference_pair
    from ..numerics import compare

    opts.say("\n== mixed-batch smoke pass (no GPU: correctness only, no timings) ==")
    dtype = opts.torch_dtype
    m, rank = shape_table.SMOKE_M, shape_table.SMOKE_RANK
    shape = shape_table.LayerShape("smoke.mixed", 96, 128, True)
    case = opts.case(m, shape, rank)
    adapters = adapters_for(case, 3)
    dy = torch.randn(m, shape.n, generator=torch.Generator().manual_seed(7)).to(dtype)
    truth, baseline = mixed_reference_pair(case, adapters, torch.arange(m) % 3, dtype, dy)
    out, failed = [], False
    for provider in PROVIDERS:
        row = {"provider": provider, "worst": "", "max_err": math.nan, "bound": math.nan}
        try:
            fn, params = build(provider, case, adapters, m)
            x = case.x.detach().to(dtype).clone().requires_grad_(True)
            (y,) = fn(x)
            y.backward(dy.to(y.dtype))
            if provider == SINGLE:  # one adapter on every row: not this batch's function
                row["status"] = "ok"  # (the per-layer smoke pass checks it)
            else:
                got = {"y": y.detach(), "dx": x.grad}
                for g in range(len(adapters)):
                    got.update({f"dA{g}": params[2 * g].grad, f"dB{g}": params[2 * g + 1].grad})
                row.update(report.smoke_result([compare(k, v, truth[k], baseline[k], dtype)
                                                for k, v in got.items()]))
            xs, dyss = inputs([case], m, dtype, 1)
            for mode in MODES:
                block_callable(fn, _block_mode(mode), xs, dyss)()
        except Exception as exc:
            row["status"] = f"error: {type(exc).__name__}: {exc}"
        failed |= row["status"] != "ok"
        out.append(row)
    opts.say(report.text_table(out, _SMOKE_COLUMNS))
    with open(os.path.join(opts.out, "mixed_smoke.md"), "w", encoding="utf-8") as fh:
        fh.write("# fastlora bench mixed-batch smoke pass (no GPU)\n\nCorrectness only: the "
                 "fused mixed batch, PEFT's mixed batch and one adapter at a time, on a tiny "
                 "layer with three adapters, against the float64 reference.mixed_linear_4bit "
                 "(y, dx, every adapter's dA and dB; fastlora.numerics bound); every provider "
                 "runs each mode once. Timings need a CUDA GPU.\n\n"
                 + report.markdown_table(out, _SMOKE_COLUMNS) + "\n")
    opts.say("mixed-batch smoke pass: " + ("FAILED (see status)" if failed else
                                           "every provider ran; the mixed batches matched the "
                                           "float64 reference"))
    return 1 if failed else 0


def modelled_rows(opts, ceilings: dict, mixed_ceilings) -> list[dict]:
    """One row per GPU x shape x M x rank x adapter count x mode: each provider's modelled
    us. ceilings: {GPU: {kernel: ceiling}}; mixed_ceilings(gpu, total rank) -> the same for
    the mixed batch's kernels at its summed rank."""
    rows = []
    for gpu in opts.gpus:
        peak = peak_named(gpu)
        for shape, m, rank, count, mode in itertools.product(
                opts.shapes, opts.ms, opts.ranks, ADAPTER_COUNTS, MODES):
            d = opts.dims(m, shape, rank)
            layer_mode = {"mixed_forward": "forward", "mixed_full": "full"}[mode]
            us = {}
            for provider in PROVIDERS:
                steps = model.mixed_steps(provider, layer_mode, d, count)
                table = mixed_ceilings(gpu, rank * count) if provider == "fastlora_mixed" \
                    else ceilings.get(gpu, {})
                us[provider] = 1e6 * model.modelled_seconds(steps, peak, table)
            rows.append({"gpu": gpu, "shape": shape.name, "m": m, "rank": rank,
                         "adapters": count, "mode": mode, **us,
                         "vs_single": us["fastlora_mixed"] / us[SINGLE],
                         "vs_peft": us["peft_mixed_bnb"] / us["fastlora_mixed"]})
    return rows


def run_modelled(opts) -> list[dict]:
    """The modelled mixed-batch table (mixed_modelled.md), printed; returns its rows."""
    klass = model.dtype_class(torch.finfo(opts.torch_dtype).bits // 8)
    ceilings, failed = {}, {}
    for gpu in opts.gpus:
        try:
            ceilings[gpu] = model.kernel_ceilings(model.GPU_ARCHS[gpu], klass)
        except Exception as exc:  # no ptxas here: the kernels run unmodelled (at 1.0)
            ceilings[gpu], failed[gpu] = {}, f"{type(exc).__name__}: {str(exc)[-200:]}"

    def mixed_ceilings(gpu, total_rank):
        if gpu in failed:
            return {}
        return model.mixed_kernel_ceilings(model.GPU_ARCHS[gpu], total_rank, klass)
    rows = modelled_rows(opts, ceilings, mixed_ceilings)
    note = ("MODELLED, not measured: fastlora.bench.model.mixed_steps, each fastlora kernel at "
            "its compiled hot-loop ceiling (the mixed batch's U, dU/dB and dA kernels at the "
            "ceiling of their summed rank: fastlora.bench.model.mixed_kernel_ceilings), PEFT's "
            f"kernels at the assumed library efficiencies ({model.PEER_GEMM_EFFICIENCY:.2f} of "
            f"tensor peak, {model.PEER_BANDWIDTH_EFFICIENCY:.2f} of bandwidth), "
            f"{model.LAUNCH_OVERHEAD_S * 1e6:g} us a launch; dropout 0; tokens spread evenly. "
            "A first-order model: the fastlora times are optimistic bounds of what its machine "
            "code allows.")
    for gpu, why in failed.items():
        note += f"\n- {gpu}: no compiled ceilings ({why}); its fastlora kernels run at 1.0"
    with open(os.path.join(opts.out, "mixed_modelled.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# fastlora bench: mixed batches, modelled table (no GPU was available)\n\n"
                 f"{note}\n\n" + report.markdown_table(rows, _MODELLED_COLUMNS) + "\n")
    opts.say(f"\n== mixed-batch modelled table ==\n{note}\n"
             + report.text_table(rows, _MODELLED_COLUMNS))
    return rows

