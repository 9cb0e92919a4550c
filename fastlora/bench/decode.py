"""`fastlora bench --modes decode`: one decoder layer's seven LoRA projections at generation
sizes (issue 29, part 5), forward without autograd, M = 1, 4, 16 tokens.

Each selected model (fastlora.bench.shapes.MODELS; default Llama-3-8B) contributes its decoder
layer: q/k/v (one input), o, gate/up (one input), down. Providers:
    fastlora          each projection its own fastlora.lora_linear_4bit call
    fastlora_grouped  q/k/v and gate/up as fastlora.lora_group_4bit calls, o and down alone
    fastlora_graph    fastlora_grouped captured once in a CUDA graph and replayed (GPU only)
    peft_bnb          PEFT's LoRA Linear4bit over bitsandbytes per projection (generation
                      runs bitsandbytes' fused 4-bit inference kernel there)
    dequant_mm        dequantize W into a buffer + cuBLAS + the LoRA addmm per projection
Against the floor: the seven packed weights (with their absmax) read once at the GPU's
datasheet DRAM bandwidth, which is what a decode step of this layer cannot beat.

Without a GPU (always written, labelled modelled): decode_modelled.md / .csv, per GPU of
`--gpu` (default H100 SXM, A100 SXM 80GB), the launches of each provider, their modelled time
(fastlora.bench.model: fastlora's kernels at their compiled hot-loop ceilings, the peers at
the model's assumed library efficiencies, LAUNCH_OVERHEAD_S a launch; not a measurement), the
floor, and at M = 1 the host time of a decoder layer's seven calls measured on this machine
(fastlora.bench.hosttime: one layer call's Python time, GPU work recorded, times 7).
On a GPU, also measured: decode.csv (appended) / decode.md, the median of each provider's
forward of the whole layer (triton.testing.do_bench, L2 flushed), against the same floor.
"""

from __future__ import annotations

import math
import os

import torch

from . import model, report, shapes as shape_table

DECODE_MS = (1, 4, 16)
# the decoder layer's LoRA projections in call order, as the blocks that share an input
BLOCKS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
          ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))
MODELLED = ("fastlora", "fastlora_grouped", "peft_bnb", "dequant_mm")
MEASURED = ("fastlora", "fastlora_grouped", "fastlora_graph", "peft_bnb", "dequant_mm")
BASELINE = "peft_bnb"
CALLS_PER_LAYER = sum(len(names) for _, names in BLOCKS)  # host time: layer calls of a layer
_MODELLED_COLUMNS = [
    ("gpu", "GPU"), ("model", "model"), ("m", "M"), ("rank", "r"), ("provider", "provider"),
    ("launches", "launches / decoder layer"), ("modelled_us", "modelled us"),
    ("launch_us", "of which launch cost us"), ("floor_us", "weight-read floor us"),
    ("x_floor", "x floor"), ("vs_peft", "PEFT / this"),
    ("host_us", "host us / decoder layer (measured here, M = 1)")]
_MEASURED_COLUMNS = [
    ("model", "model"), ("m", "M"), ("rank", "r"), ("provider", "provider"),
    ("median_us", "median us"), ("floor_us", "weight-read floor us"), ("x_floor", "x floor"),
    ("vs_peft", "PEFT / this"), ("status", "status")]


def decoder_layers(shapes) -> list[tuple[str, dict]]:
    """(model, {projection: LayerShape}) for every model with a selected layer (its whole
    decoder layer: all seven projections)."""
    out = []
    for name in dict.fromkeys(s.name.rpartition(".")[0] for s in shapes):
        if name in shape_table.MODELS:
            out.append((name, {s.name.rpartition(".")[2]: s for s in shape_table.MODELS[name]}))
    return out


def layer_steps(provider: str, opts, m: int, layers: dict, rank: int) -> list:
    """The launches (fastlora.bench.model.Step) of `provider`'s forward of one decoder layer
    at M = m (module doc): fastlora on its fused path, a group at 3 <= M <= 16 in its two
    launches (model.group_forward_steps), at M <= 2 its members' one launch each."""
    if provider not in MODELLED:
        raise ValueError(f"no decode model for provider {provider!r}: choose from "
                         f"{', '.join(MODELLED)}")
    if not 0 < m <= model.SMALL_M_MAX:
        raise ValueError(f"the decode model covers 1 <= M <= {model.SMALL_M_MAX}, got {m}")
    out = []
    for _, names in BLOCKS:
        ds = [opts.dims(m, layers[n], rank) for n in names]
        if provider == "fastlora_grouped" and len(ds) > 1 and m > model.GEMV_MAX_M:
            out += model.group_forward_steps(ds)
            continue
        for d in ds:
            if provider == "peft_bnb":
                out += model.peft_bnb_inference(d)
            else:
                out += model.steps("dequant_mm" if provider == "dequant_mm" else "fastlora",
                                   "forward", d)
    return out


def floor_bytes(opts, layers: dict) -> int:
    """The seven packed weights and their absmax, each read once (model.weight_bytes)."""
    return sum(model.weight_bytes(opts.dims(1, shape, 1)) for shape in layers.values())


def modelled_rows(opts, ceilings: dict, host_us: dict) -> list[dict]:
    """One row per GPU x model x rank x M x provider. ceilings: {GPU name: {kernel: ceiling}}
    (fastlora.bench.modelled.modelled_ceilings); host_us: {provider: us per decoder layer} at
    M = 1 (measured), possibly empty."""
    from .peaks import peak_named

    rows = []
    for gpu in opts.gpus:
        peak = peak_named(gpu)
        for name, layers in decoder_layers(opts.shapes):
            floor = floor_bytes(opts, layers) / (peak.gbs * 1e9)
            for rank in opts.ranks:
                for m in DECODE_MS:
                    steps = {p: layer_steps(p, opts, m, layers, rank) for p in MODELLED}
                    times = {p: model.modelled_seconds(st, peak, ceilings.get(gpu, {}))
                             for p, st in steps.items()}
                    for p in MODELLED:
                        rows.append({
                            "gpu": gpu, "model": name, "m": m, "rank": rank, "provider": p,
                            "launches": len(steps[p]), "modelled_us": 1e6 * times[p],
                            "launch_us": 1e6 * len(steps[p]) * model.LAUNCH_OVERHEAD_S,
                            "floor_us": 1e6 * floor, "x_floor": times[p] / floor,
                            "vs_peft": times[BASELINE] / times[p],
                            "host_us": host_us.get(p, math.nan) if m == 1 else math.nan})
    return rows


def measure_host_us(device: str) -> tuple[dict, str]:
    """({provider: host us per decoder layer at M = 1}, note): one layer call's Python time
    (fastlora.bench.hosttime.measure, GPU work recorded) times CALLS_PER_LAYER, for fastlora's
    patched layer and PEFT's; ({}, why) when it cannot be measured here."""
    from . import hosttime

    try:
        got = hosttime.measure(device, 1)
    except Exception as exc:  # no bitsandbytes CPU backend, a PEFT that changed its layer
        return {}, f"host time not measured ({type(exc).__name__}: {exc})"
    per_layer = {p: CALLS_PER_LAYER * us for p, (us, _) in got.items()}
    return per_layer, (f"host us: one layer call at M = 1 on {device} (K = N = "
                       f"{hosttime.K}, r = {hosttime.RANK}; host time does not depend on the "
                       f"shape) times {CALLS_PER_LAYER} calls, measured with "
                       "fastlora.bench.hosttime; grouped calls and dequant_mm not measured")


def run(opts) -> int:
    """The modelled table (always) and, on a GPU, the measured one; returns the exit code."""
    from .modelled import modelled_ceilings, modelled_note

    os.makedirs(opts.out, exist_ok=True)
    layers = decoder_layers(opts.shapes)
    if not layers:
        opts.say("decode: no selected model has a decoder layer in the shape table "
                 f"({', '.join(shape_table.MODELS)}); nothing to do")
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceilings, failed = modelled_ceilings(opts)
    host_us, host_note = measure_host_us(device)
    rows = modelled_rows(opts, ceilings, host_us)
    note = (f"{modelled_note(opts, ceilings, failed)}\n\nForward of one decoder layer without "
            "autograd (generation), dropout 0; fastlora on its fused path (its dispatcher "
            "times that against dequantize + cuBLAS on a GPU). Floor: the seven packed "
            f"weights read once at datasheet bandwidth. {host_note}.")
    title = f"decode: one decoder layer's forward, {opts.dtype} (modelled)"
    opts.say(f"\n== {title} ==\n{note}\n" + report.text_table(rows, _MODELLED_COLUMNS))
    report.append_csv(os.path.join(opts.out, "decode_modelled.csv"), rows)
    with open(os.path.join(opts.out, "decode_modelled.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# fastlora bench: {title}\n\n{note}\n\n"
                 + report.markdown_table(rows, _MODELLED_COLUMNS) + "\n")
    if device != "cuda":
        opts.say("decode: no CUDA GPU here, so nothing was timed (the table above is a model)")
        return 0
    return _run_gpu(opts, layers)


# ----------------------------------------------------------------------------- on a GPU

def _layer_callable(provider: str, block_cases: list):
    """fn() running `provider`'s forward of the decoder layer once on the cases' inputs
    (one case list per block, members sharing their block's x)."""
    from . import block, providers

    calls = []
    for cases in block_cases:
        x = cases[0].x
        if provider in ("fastlora_grouped", "fastlora_graph") and len(cases) > 1:
            fn = block.build("fastlora_grouped", cases)[0]
            calls.append(lambda fn=fn, x=x: fn(x))
            continue
        build = {"fastlora": providers.build_fastlora, "fastlora_grouped":
                 providers.build_fastlora, "fastlora_graph": providers.build_fastlora,
                 "peft_bnb": providers.build_peft_bnb,
                 "dequant_mm": providers.build_dequant_mm}[provider]
        calls += [lambda fn=build(c).fn, x=x: fn(x) for c in cases]

    def forward():
        return [call() for call in calls]
    if provider != "fastlora_graph":
        return forward
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune, the dispatcher's picks: outside the capture
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def _run_gpu(opts, layers) -> int:
    from triton.testing import do_bench

    from . import block
    from .peaks import peak_for

    peak = peak_for(torch.cuda.get_device_name(0))
    rows, failed = [], False
    for name, by_proj in layers:
        floor = floor_bytes(opts, by_proj) / (peak.gbs * 1e9) if peak else math.nan
        for rank in opts.ranks:
            for m in DECODE_MS:
                block_cases = [block.member_cases(opts, m, [by_proj[n] for n in names], rank)
                               for _, names in BLOCKS]
                times = {}
                mine = []
                for provider in MEASURED:
                    row = {"model": name, "m": m, "rank": rank, "provider": provider,
                           "median_us": math.nan, "floor_us": 1e6 * floor, "status": "ok"}
                    try:
                        with torch.no_grad():
                            once = _layer_callable(provider, block_cases)
                            once()
                            times[provider] = float(do_bench(
                                once, warmup=opts.warmup_ms, rep=opts.rep_ms,
                                return_mode="median")) * 1e-3
                        row["median_us"] = 1e6 * times[provider]
                    except Exception as exc:  # one provider failing must not stop the others
                        row["status"] = f"error: {type(exc).__name__}: {exc}"
                        failed = True
                    mine.append(row)
                for row in mine:
                    t = times.get(row["provider"], math.nan)
                    row["x_floor"] = t / floor if floor else math.nan
                    row["vs_peft"] = times.get(BASELINE, math.nan) / t
                rows += mine
    block.write_measured(opts, rows, _MEASURED_COLUMNS, "decode",
                         "one decoder layer's forward at M = 1, 4, 16")
    return 1 if failed else 0
