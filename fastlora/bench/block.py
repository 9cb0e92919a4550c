"""`fastlora bench --modes block`: projections that share an input, timed as a block (issue 13).

Blocks of each selected model (fastlora.bench.shapes.MODELS): qkv = q_proj, k_proj, v_proj;
gate_up = gate_proj, up_proj. Every member has its own bitsandbytes-quantised weight and LoRA
tensors (opts.case), and all read one x. Providers:
    fastlora          the members as separate fastlora.lora_linear_4bit calls (per layer)
    fastlora_grouped  one fastlora.lora_group_4bit call (fastlora/launch/group.py)
    peft_bnb          a PEFT LoRA Linear4bit over bitsandbytes per member (QLoRA today)
Modes: block_forward (all outputs) and block_full (forward + backward of all outputs).

On a GPU: median ms per provider (triton.testing.do_bench, L2 flushed; x and the output
gradients rotate over copies that exceed 2 x L2), grouped over per-layer and over PEFT, written
to block.csv (appended) and block.md. Without one: a smoke pass on a tiny block (kernels in the
interpreter), every provider's outputs and gradients against float64 (fastlora.numerics), no
timings.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os

import torch

from . import report, shapes as shape_table
from .timing import copies_needed

BLOCKS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
PROVIDERS = ("fastlora", "fastlora_grouped", "peft_bnb")
MODES = ("block_forward", "block_full")
PER_LAYER = "fastlora"
_COLUMNS = [("model", "model"), ("block", "block"), ("m", "M"), ("rank", "r"),
            ("mode", "mode"), ("provider", "provider"), ("median_ms", "median ms"),
            ("vs_per_layer", "per-layer / this"), ("vs_peft", "PEFT / this"), ("status", "status")]
_SMOKE_COLUMNS = [("block", "block"), ("provider", "provider"), ("worst", "worst"),
                  ("max_err", "max err"), ("bound", "bound"), ("status", "status")]


def blocks(shapes) -> list[tuple[str, str, list]]:
    """(model, block, member shapes) for every model with a selected layer."""
    models = dict.fromkeys(s.name.rpartition(".")[0] for s in shapes)  # "qwen2.5-7b.q_proj"
    out = []
    for model in models:
        if model not in shape_table.MODELS:
            continue
        by_name = {s.name.rpartition(".")[2]: s for s in shape_table.MODELS[model]}
        out += [(model, block, [by_name[n] for n in names]) for block, names in BLOCKS.items()]
    return out


def member_cases(opts, m: int, members, rank: int) -> list:
    """One LoraCase per member (its own weight, A, B, bias: seeds 0, 1, ...), all with the
    first one's x."""
    from ..cases import make_case

    cases = [make_case(m, shape.n, shape.k, rank, opts.torch_dtype, opts.quant_type,
                       opts.blocksize, opts.double_quant, bias=shape.bias, seed=i)
             for i, shape in enumerate(members)]
    return [dataclasses.replace(c, x=cases[0].x) for c in cases]


def build(provider: str, cases) -> tuple:
    """(fn(x) -> [y per member], trainable leaves)."""
    import fastlora

    if provider == "peft_bnb":
        from .providers import peft_bnb_layer

        layers = [peft_bnb_layer(c) for c in cases]
        params = [t for layer in layers for t in (layer.lora_A["default"].weight,
                                                  layer.lora_B["default"].weight)]
        return (lambda x: [layer(x) for layer in layers]), params
    leaves = [(c.lora_A.detach().clone().requires_grad_(True),
               c.lora_B.detach().clone().requires_grad_(True)) for c in cases]
    params = [t for pair in leaves for t in pair]
    if provider == "fastlora":
        return (lambda x: [fastlora.lora_linear_4bit(x, c.packed, c.state, a, b, c.scaling,
                                                     c.bias)
                           for c, (a, b) in zip(cases, leaves)]), params
    if provider == "fastlora_grouped":
        members = [fastlora.GroupMember(c.packed, c.state, a, b, c.scaling, c.bias)
                   for c, (a, b) in zip(cases, leaves)]
        return (lambda x: fastlora.lora_group_4bit(x, members)), params
    raise ValueError(f"unknown block provider {provider!r}: choose from {', '.join(PROVIDERS)}")


def block_callable(fn, mode: str, xs: list, dyss: list):
    """A no-argument function running `mode` once on the next input copy."""
    turn = itertools.cycle(range(len(xs)))
    if mode == "block_forward":
        return lambda: fn(xs[next(turn)])
    if mode == "block_full":
        def full():
            i = next(turn)
            torch.autograd.backward(fn(xs[i]), dyss[i])
        return full
    raise ValueError(f"block mode must be one of {MODES}, got {mode!r}")


def run(opts) -> int:
    """The block benchmark on a GPU, else its smoke pass; returns the exit code."""
    if torch.cuda.is_available():
        return _run_gpu(opts)
    return _run_smoke(opts)


def inputs(cases, m: int, dtype, copies: int):
    """`copies` input sets for the members' x [M, K] (shared) and their dy [M, N_g], on the
    cases' device (also the DoRA and mixed-batch modes' inputs, one case each)."""
    g = torch.Generator(device=cases[0].x.device).manual_seed(0)
    k = cases[0].state.shape[1]
    dev = cases[0].x.device
    xs = [torch.randn(m, k, generator=g, device=dev, dtype=dtype).requires_grad_(True)
          for _ in range(copies)]
    dyss = [[torch.randn(m, c.state.shape[0], generator=g, device=dev, dtype=dtype)
             for c in cases] for _ in range(copies)]
    return xs, dyss


def time_providers(opts, providers, build_one, mode: str, xs: list, dyss: list,
                   row: dict) -> tuple[list, dict, bool]:
    """Each provider's median ms for `mode` (triton.testing.do_bench, L2 flushed, inputs
    rotating): (rows, {provider: ms}, whether one failed). build_one(provider) -> (fn(x) ->
    [y], trainable leaves); `row`: the columns every row starts with. A provider that fails
    gets its error as status and does not stop the others."""
    from triton.testing import do_bench

    rows, times, failed = [], {}, False
    for provider in providers:
        out = {**row, "mode": mode, "provider": provider, "median_ms": math.nan, "status": "ok"}
        try:
            fn, params = build_one(provider)
            once = block_callable(fn, mode, xs, dyss)
            once()
            out["median_ms"] = times[provider] = float(do_bench(
                once, warmup=opts.warmup_ms, rep=opts.rep_ms, grad_to_none=xs + params,
                return_mode="median"))
        except Exception as exc:  # one provider failing must not stop the others
            out["status"] = f"error: {type(exc).__name__}: {exc}"
            failed = True
        rows.append(out)
    return rows, times, failed


def write_measured(opts, rows: list, columns: list, name: str, title: str) -> None:
    """<name>.csv (appended, with the GPU and dtype) and <name>.md of measured rows."""
    path = os.path.join(opts.out, f"{name}.csv")
    new = not os.path.exists(path)
    gpu = torch.cuda.get_device_name(0)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[key for key, _ in columns] + ["gpu", "dtype"])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "gpu": gpu, "dtype": opts.dtype})
    with open(os.path.join(opts.out, f"{name}.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# fastlora bench: {title} ({gpu}, {opts.dtype}, measured)\n\n"
                 + report.markdown_table(rows, columns) + "\n")
    opts.say(report.text_table(rows, columns))


def _run_gpu(opts) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    rows, failed = [], False
    dtype = opts.torch_dtype
    elt = torch.finfo(dtype).bits // 8
    for (model, block, members), m, rank, mode in itertools.product(
            blocks(opts.shapes), opts.ms, opts.ranks, MODES):
        cases = member_cases(opts, m, members, rank)
        per_copy = m * (members[0].k + sum(s.n for s in members)) * elt
        xs, dyss = inputs(cases, m, dtype, copies_needed(per_copy, l2))
        mine, times, bad = time_providers(
            opts, PROVIDERS, lambda provider: build(provider, cases), mode, xs, dyss,
            {"model": model, "block": block, "m": m, "rank": rank})
        for row in mine:
            ms = row["median_ms"]
            row["vs_per_layer"] = times.get(PER_LAYER, math.nan) / ms
            row["vs_peft"] = times.get("peft_bnb", math.nan) / ms
        rows += mine
        failed |= bad
    write_measured(opts, rows, _COLUMNS, "block", "blocks")
    return 1 if failed else 0


def _run_smoke(opts) -> int:
    from .. import reference
    from ..numerics import compare

    opts.say("\n== block smoke pass (no GPU: correctness only, no timings) ==")
    dtype = opts.torch_dtype
    m, rank = shape_table.SMOKE_M, shape_table.SMOKE_RANK
    tiny = {"qkv": [shape_table.LayerShape("smoke.q", 64, 64),
                    shape_table.LayerShape("smoke.k", 32, 64, True),
                    shape_table.LayerShape("smoke.v", 32, 64)],
            "gate_up": [shape_table.LayerShape("smoke.gate", 96, 64),
                        shape_table.LayerShape("smoke.up", 96, 64)]}
    rows, failed = [], False
    for block, members in tiny.items():
        cases = member_cases(opts, m, members, rank)
        dys = [torch.randn(m, c.state.shape[0], generator=torch.Generator().manual_seed(i))
               .to(dtype) for i, c in enumerate(cases)]

        def outputs(provider_fn, params, run_dtype):
            x = cases[0].x.detach().to(run_dtype).clone().requires_grad_(True)
            ys = provider_fn(x)
            torch.autograd.backward(ys, [dy.to(y.dtype) for dy, y in zip(dys, ys)])
            out = {f"y{g}": y.detach() for g, y in enumerate(ys)}
            out.update(dx=x.grad, **{f"d{n}{g // 2}": p.grad for g, (n, p) in enumerate(
                zip(itertools.cycle("AB"), params))})
            return out

        def reference_fn(run_dtype):
            leaves = [(c.lora_A.detach().to(run_dtype).clone().requires_grad_(True),
                       c.lora_B.detach().to(run_dtype).clone().requires_grad_(True))
                      for c in cases]
            fn = (lambda x: [reference.lora_linear_4bit(
                x, c.packed, c.state, a, b, c.scaling,
                c.bias.to(run_dtype) if c.bias is not None else None)
                for c, (a, b) in zip(cases, leaves)])
            return fn, [t for pair in leaves for t in pair]
        truth = outputs(*reference_fn(torch.float64), torch.float64)
        baseline = outputs(*reference_fn(dtype), dtype)
        for provider in PROVIDERS:
            row = {"block": block, "provider": provider, "worst": "", "max_err": math.nan,
                   "bound": math.nan}
            try:
                got = outputs(*build(provider, cases), dtype)
                checks = [compare(k, got[k], truth[k], baseline[k], dtype) for k in truth]
                row.update(report.smoke_result(checks))
                xs, dyss = inputs(cases, m, dtype, 1)
                for mode in MODES:
                    block_callable(build(provider, cases)[0], mode, xs, dyss)()
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {exc}"
            failed |= row["status"] != "ok"
            rows.append(row)
    opts.say(report.text_table(rows, _SMOKE_COLUMNS))
    with open(os.path.join(opts.out, "block_smoke.md"), "w", encoding="utf-8") as fh:
        fh.write("# fastlora bench block smoke pass (no GPU)\n\nCorrectness only: each "
                 "provider's block outputs and gradients on tiny shapes against the float64 "
                 "reference (fastlora.numerics bound). Block timings need a CUDA GPU.\n\n"
                 + report.markdown_table(rows, _SMOKE_COLUMNS) + "\n")
    opts.say("block smoke pass: " + ("FAILED (see status)" if failed else
                                     "every provider matched the float64 reference"))
    return 1 if failed else 0
