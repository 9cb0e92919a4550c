"""`fastlora bench --modes dora`: a DoRA layer over a 4-bit base (issue 12), per layer shape.

Providers, each on the same bitsandbytes-quantised weight, LoRA tensors and bias (opts.case)
and the same magnitude (fastlora.cases.dora_magnitude):
    fastlora       the plain LoRA layer, fastlora.lora_linear_4bit (what DoRA is measured
                   against: the goal is DoRA forward + backward <= 1.15x of it at M = 4096)
    fastlora_dora  fastlora.dora_linear_4bit
    peft_dora_bnb  PEFT's DoRA Linear4bit over bitsandbytes (QDoRA today)
Modes: dora_forward and dora_full (forward + backward). Dropout 0.

On a GPU: median ms per provider (triton.testing.do_bench, L2 flushed, inputs rotating over
copies that exceed 2 x L2), "x of plain LoRA" (this / fastlora) and "PEFT DoRA / this", written
to dora.csv (appended) and dora.md. Without one: a smoke pass on a tiny layer (kernels in the
interpreter), every provider's outputs and gradients against its float64 reference
(fastlora.numerics), and a MODELLED table (dora_modelled.md: fastlora.bench.model.dora_steps
at the kernels' compiled hot-loop ceilings, PEFT at the assumed library efficiencies).
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

PROVIDERS = ("fastlora", "fastlora_dora", "peft_dora_bnb")
MODES = ("dora_forward", "dora_full")
PLAIN = "fastlora"
PEFT = "peft_dora_bnb"
_COLUMNS = [("shape", "shape"), ("m", "M"), ("rank", "r"), ("mode", "mode"),
            ("provider", "provider"), ("median_ms", "median ms"),
            ("vs_plain", "x of plain LoRA"), ("vs_peft", "PEFT DoRA / this"), ("status", "status")]
_MODELLED_COLUMNS = [("gpu", "GPU"), ("shape", "shape"), ("m", "M"), ("rank", "r"),
                     ("mode", "mode"), ("fastlora", "plain LoRA us"),
                     ("fastlora_dora", "fastlora DoRA us"), ("peft_dora_bnb", "PEFT DoRA us"),
                     ("vs_plain", "DoRA x of plain"), ("vs_peft", "PEFT DoRA / fastlora DoRA")]
_SMOKE_COLUMNS = [("provider", "provider"), ("worst", "worst"), ("max_err", "max err"),
                  ("bound", "bound"), ("status", "status")]


def build(provider: str, case, magnitude: torch.Tensor) -> tuple:
    """(fn(x) -> [y], trainable leaves) of a provider on a case and its magnitude."""
    import fastlora

    if provider == PEFT:
        from .providers import peft_bnb_layer

        layer = peft_bnb_layer(case, magnitude=magnitude)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                  layer.lora_magnitude_vector["default"].weight]
        return (lambda x: [layer(x)]), params
    a = case.lora_A.detach().clone().requires_grad_(True)
    b = case.lora_B.detach().clone().requires_grad_(True)
    if provider == PLAIN:
        return (lambda x: [fastlora.lora_linear_4bit(x, case.packed, case.state, a, b,
                                                     case.scaling, case.bias)]), [a, b]
    if provider == "fastlora_dora":
        mag = magnitude.detach().clone().requires_grad_(True)
        return (lambda x: [fastlora.dora_linear_4bit(x, case.packed, case.state, a, b,
                                                     case.scaling, mag, case.bias)]), [a, b, mag]
    raise ValueError(f"unknown DoRA provider {provider!r}: choose from {', '.join(PROVIDERS)}")


def _block_mode(mode: str) -> str:
    """The block helper's mode name for a DoRA mode."""
    return {"dora_forward": "block_forward", "dora_full": "block_full"}[mode]


def run(opts) -> int:
    """The DoRA benchmark on a GPU, else its smoke pass and modelled table; the exit code."""
    if torch.cuda.is_available():
        return _run_gpu(opts)
    code = _run_smoke(opts)
    run_modelled(opts)
    return code


def _run_gpu(opts) -> int:
    from ..cases import dora_magnitude

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    rows, failed = [], False
    dtype = opts.torch_dtype
    elt = torch.finfo(dtype).bits // 8
    for shape, m, rank, mode in itertools.product(opts.shapes, opts.ms, opts.ranks, MODES):
        case = opts.case(m, shape, rank)
        magnitude = dora_magnitude(case)
        xs, dyss = inputs([case], m, dtype, copies_needed(m * (shape.k + shape.n) * elt, l2))
        mine, times, bad = time_providers(
            opts, PROVIDERS, lambda provider: build(provider, case, magnitude), _block_mode(mode),
            xs, dyss, {"shape": shape.name, "m": m, "rank": rank})
        for row in mine:
            ms, row["mode"] = row["median_ms"], mode
            row["vs_plain"] = ms / times.get(PLAIN, math.nan)
            row["vs_peft"] = times.get(PEFT, math.nan) / ms
        rows += mine
        failed |= bad
    write_measured(opts, rows, _COLUMNS, "dora", "DoRA")
    return 1 if failed else 0


def _run_smoke(opts) -> int:
    from ..cases import dora_magnitude, dora_reference_pair, reference_pair
    from ..numerics import compare

    opts.say("\n== DoRA smoke pass (no GPU: correctness only, no timings) ==")
    dtype = opts.torch_dtype
    m, rank = shape_table.SMOKE_M, shape_table.SMOKE_RANK
    shape = shape_table.LayerShape("smoke.dora", 96, 128, True)
    case = opts.case(m, shape, rank)
    magnitude = dora_magnitude(case)
    dy = torch.randn(m, shape.n, generator=torch.Generator().manual_seed(7)).to(dtype)

    def outputs(fn, params, run_dtype):
        x = case.x.detach().to(run_dtype).clone().requires_grad_(True)
        (y,) = fn(x)
        y.backward(dy.to(y.dtype))
        out = {"y": y.detach(), "dx": x.grad, "dA": params[0].grad, "dB": params[1].grad}
        if len(params) > 2:
            out["dmag"] = params[2].grad
        return out

    # the float64 truth and plain PyTorch in dtype: the plain layer's, the DoRA layer's
    refs = {False: reference_pair(case, dtype, dy),
            True: dora_reference_pair(case, magnitude, dtype, dy)}
    rows, failed = [], False
    for provider in PROVIDERS:
        row = {"provider": provider, "worst": "", "max_err": math.nan, "bound": math.nan}
        try:
            truth, baseline = refs[provider != PLAIN]
            got = outputs(*build(provider, case, magnitude), dtype)
            checks = [compare(k, got[k], truth[k], baseline[k], dtype) for k in got]
            row.update(report.smoke_result(checks))
            xs, dyss = inputs([case], m, dtype, 1)
            for mode in MODES:
                block_callable(build(provider, case, magnitude)[0], _block_mode(mode), xs, dyss)()
        except Exception as exc:
            row["status"] = f"error: {type(exc).__name__}: {exc}"
        failed |= row["status"] != "ok"
        rows.append(row)
    opts.say(report.text_table(rows, _SMOKE_COLUMNS))
    with open(os.path.join(opts.out, "dora_smoke.md"), "w", encoding="utf-8") as fh:
        fh.write("# fastlora bench DoRA smoke pass (no GPU)\n\nCorrectness only: each "
                 "provider's outputs and gradients (the magnitude's included) on a tiny layer "
                 "against its float64 reference (fastlora.numerics bound). DoRA timings need a "
                 "CUDA GPU.\n\n" + report.markdown_table(rows, _SMOKE_COLUMNS) + "\n")
    opts.say("DoRA smoke pass: " + ("FAILED (see status)" if failed else
                                    "every provider matched its float64 reference"))
    return 1 if failed else 0


def modelled_rows(opts, ceilings: dict) -> list[dict]:
    """One row per GPU x shape x M x rank x mode: each provider's modelled us, the DoRA layer
    over the plain one, PEFT DoRA over fastlora DoRA. ceilings: {GPU: {kernel: ceiling}}."""
    rows = []
    for gpu in opts.gpus:
        peak = peak_named(gpu)
        for shape, m, rank, mode in itertools.product(opts.shapes, opts.ms, opts.ranks, MODES):
            d = opts.dims(m, shape, rank)
            layer_mode = {"dora_forward": "forward", "dora_full": "full"}[mode]
            us = {p: 1e6 * model.modelled_seconds(model.dora_steps(p, layer_mode, d), peak,
                                                  ceilings.get(gpu, {}))
                  for p in PROVIDERS}
            rows.append({"gpu": gpu, "shape": shape.name, "m": m, "rank": rank, "mode": mode,
                         **us, "vs_plain": us["fastlora_dora"] / us[PLAIN],
                         "vs_peft": us[PEFT] / us["fastlora_dora"]})
    return rows


def run_modelled(opts) -> list[dict]:
    """The modelled DoRA table (dora_modelled.md), printed; returns its rows."""
    klass = model.dtype_class(torch.finfo(opts.torch_dtype).bits // 8)
    ceilings, failed = {}, {}
    for gpu in opts.gpus:
        try:
            ceilings[gpu] = model.dora_kernel_ceilings(model.GPU_ARCHS[gpu], klass)
        except Exception as exc:  # no ptxas here: the kernels run unmodelled (at 1.0)
            ceilings[gpu], failed[gpu] = {}, f"{type(exc).__name__}: {str(exc)[-200:]}"
    rows = modelled_rows(opts, ceilings)
    note = ("MODELLED, not measured: fastlora.bench.model.dora_steps, each fastlora kernel at "
            "its compiled hot-loop ceiling, PEFT's kernels at the assumed library efficiencies "
            f"({model.PEER_GEMM_EFFICIENCY:.2f} of tensor peak, "
            f"{model.PEER_BANDWIDTH_EFFICIENCY:.2f} of bandwidth), "
            f"{model.LAUNCH_OVERHEAD_S * 1e6:g} us a launch; dropout 0. A first-order model: "
            "the fastlora times are optimistic bounds of what its machine code allows.")
    for gpu, why in failed.items():
        note += f"\n- {gpu}: no compiled ceilings ({why}); its fastlora kernels run at 1.0"
    table = report.markdown_table(rows, _MODELLED_COLUMNS)
    with open(os.path.join(opts.out, "dora_modelled.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# fastlora bench: DoRA, modelled table (no GPU was available)\n\n{note}\n\n"
                 + table + "\n")
    opts.say(f"\n== DoRA modelled table ==\n{note}\n" + report.text_table(rows,
                                                                        _MODELLED_COLUMNS))
    return rows
