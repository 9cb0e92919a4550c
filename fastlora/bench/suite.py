"""`fastlora bench`: the per-layer QLoRA benchmark suite.

On a CUDA GPU it times every provider (fastlora.bench.providers) on every selected shape, M,
rank and mode, and writes results.csv (appended), results.md and speedup PNGs. Without a GPU
it says so, runs a smoke pass of every provider on tiny shapes (the Triton kernels in the CPU
interpreter; correctness only, no timings: CPU times say nothing about GPU speed) and writes a
modelled table for H100 and A100, or the GPUs `--gpu` names (fastlora/gpus.py), from
fastlora.bench.model: fastlora's kernels at their compiled hot-loop ceilings, the peers at
assumed cuBLAS-like efficiencies; every number labelled "modelled". Both end with the
ahead-of-time compile report of the shipped kernel configs (without a GPU it is compiled
before the modelled table, which reads its ceilings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backend
from ..cases import make_case, reference_pair
from ..numerics import compare
from . import model, report, shapes as shape_table
from .modelled import modelled_ceilings, modelled_note
from .peaks import MODELLED_GPUS, peak_for, peak_named
from .providers import BASELINE, PROVIDERS, Unavailable
from .timing import copies_needed, make_inputs, measure, mode_callable

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Options:
    shapes: list
    ms: tuple
    ranks: tuple
    modes: tuple
    providers: list
    out: str
    dtype: str = "bf16"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    warmup_ms: int = 25
    rep_ms: int = 100
    compile_report: bool = True
    gpus: tuple = MODELLED_GPUS  # the modelled tables' GPUs (names in fastlora/gpus.py)
    say: Callable[[str], None] = field(default=print)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    def config(self) -> dict:
        return {"dtype": self.dtype, "quant_type": self.quant_type,
                "blocksize": self.blocksize, "double_quant": self.double_quant}

    def case(self, m: int, shape, rank: int):
        return make_case(m, shape.n, shape.k, rank, self.torch_dtype, self.quant_type,
                         self.blocksize, self.double_quant, bias=shape.bias)

    def dims(self, m: int, shape, rank: int) -> model.Dims:
        e = torch.finfo(self.torch_dtype).bits // 8
        return model.Dims(m, shape.n, shape.k, rank, e, shape.bias, self.blocksize,
                          self.double_quant)


def check_output_csv(opts: Options) -> tuple:
    """ValueError, before a run, when the CSV it appends to (results.csv on a GPU, modelled.csv
    without one) holds other columns; returns (that CSV's path, the run's columns or None when
    it writes no row there). The columns come from one row built by this module's own
    code, so they cannot drift from what the run writes: a modelled row, or a GPU row that
    skips its provider (measure_row then times nothing). The 'block', 'dora', 'mixed', 'sft'
    and 'host' modes write their own files."""
    layer_modes = tuple(m for m in opts.modes if m not in OWN_MODES)
    if not layer_modes:
        return os.path.join(opts.out, f"{opts.modes[0]}.csv"), None
    one = dataclasses.replace(opts, shapes=opts.shapes[:1], ms=opts.ms[:1],
                              ranks=opts.ranks[:1], modes=layer_modes[:1])
    if torch.cuda.is_available():
        name = opts.providers[0]
        row = measure_row(one, report.environment(torch.cuda.get_device_name()),
                          one.shapes[0], one.ranks[0], one.ms[0], one.modes[0], name,
                          built={}, skipped={name: "column check"}, xs=[], dys=[])
        derive([row], one, peak=None)
        path, columns = os.path.join(opts.out, "results.csv"), list(row)
    else:
        rows = modelled_rows(one, ceilings={})  # the columns only: no compiling
        path, columns = os.path.join(opts.out, "modelled.csv"), list(rows[0]) if rows else None
    if columns:
        report.check_csv_columns(path, columns)
    return path, columns


# modes with their own module, providers and tables, run after the per-layer modes
OWN_MODES = ("block", "dora", "mixed", "sft", "host", "decode")


def run(opts: Options) -> int:
    """Run the suite; returns the exit code (non-zero when a provider failed or the compile
    report found a problem). The 'block' (fastlora/bench/block.py), 'dora'
    (fastlora/bench/dora.py), 'mixed' (fastlora/bench/mixed.py), 'sft' (fastlora/bench/sft.py),
    'host' (fastlora/bench/hosttime.py) and 'decode' (fastlora/bench/decode.py) modes run after
    the per-layer modes."""
    from . import block, decode, dora, hosttime, mixed, sft

    own = [m for m in opts.modes if m in OWN_MODES]
    opts = dataclasses.replace(opts, modes=tuple(m for m in opts.modes if m not in OWN_MODES))
    code = _run_layers(opts) if opts.modes else 0
    for mode in own:
        module = {"block": block, "dora": dora, "mixed": mixed, "sft": sft,
                  "host": hosttime, "decode": decode}[mode]
        code = module.run(opts) or code
    return code


def _run_layers(opts: Options) -> int:
    rows = None  # the compile report's rows, when computed before the end
    if torch.cuda.is_available():
        code = run_gpu(opts)
    else:
        opts.say("No CUDA GPU found: GPU timings cannot be taken on this machine.\n"
                 "Instead: (1) a smoke pass of every provider on tiny shapes (Triton kernels in "
                 "the CPU interpreter), checked against float64 - no timings, CPU times say "
                 "nothing about GPU speed; (2) a MODELLED table for "
                 f"{' and '.join(opts.gpus)} from counted FLOPs and minimum bytes over "
                 "datasheet peaks, fastlora's kernels at their compiled hot-loop ceilings - a "
                 "model, not a measurement.")
        code = run_smoke(opts)
        # compiled once: the modelled table's hot-loop ceilings and the report at the end
        rows = compile_rows() if opts.compile_report else None
        run_modelled(opts, rows)
    if opts.compile_report and write_compile_report(opts.out, opts.say, rows=rows):
        code = code or 1
    return code


# ----------------------------------------------------------------------------- GPU

_RESULT_COLUMNS = [("shape", "shape"), ("m", "M"), ("rank", "r"), ("mode", "mode"),
                   ("provider", "provider"), ("median_ms", "median ms"), ("p20_ms", "p20 ms"),
                   ("p80_ms", "p80 ms"), (f"speedup_vs_{BASELINE}", f"x vs {BASELINE}"),
                   ("tflops", "TFLOP/s"), ("pct_peak_tflops", "% peak FLOP/s"),
                   ("gbs", "GB/s"), ("pct_peak_gbs", "% peak GB/s"), ("peak_mib", "peak MiB"),
                   ("base_path", "base path"), ("status", "status")]

# the base-product roles each mode times (fastlora.launch.dispatch.ROLES)
MODE_ROLES = {"forward": ("forward",), "backward": ("dx",), "full": ("forward", "dx")}


def base_path_of(built, name: str, shape, m: int, mode: str, dtype) -> str:
    """What a row's base product ran on: the forced path of fastlora_fused / fastlora_dequant,
    or for the dispatched fastlora the dispatcher's kept pick per role ('auto: forward=fused
    dx=dequant', forward=one_pass where that won; '?' for a role not picked, e.g. a shape past the buffer cap runs fused
    without timing); '' for the peers."""
    forced = getattr(built, "base_path", None)
    if forced is not None:
        return forced
    if name != "fastlora":
        return ""
    from ..launch import buffer, dispatch

    if not buffer.fits(shape.n, shape.k, dtype):
        return "fused (past the buffer cap)"
    def pick(role):  # an eligible forward's pick sits under the one-pass key (launch/forward.py)
        return (dispatch.pick_for(role, 'cuda', dtype, shape.n, shape.k, m)
                or (role == "forward" and m > dispatch.SMALL_M_MAX
                    and dispatch.pick_for(role, 'cuda', dtype, shape.n, shape.k, m, "one_pass"))
                or '?')
    try:
        picks = [f"{role}={pick(role)}" for role in MODE_ROLES[mode]]
    except Exception:  # no CUDA device to name (the faked-timing tests): the pick is unknown
        return "auto"
    return "auto: " + " ".join(picks)


def gpu_info() -> tuple:
    """(device name, its Peak or None, the environment columns, L2 bytes) of the current GPU."""
    name = torch.cuda.get_device_name()
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return name, peak_for(name), report.environment(name), l2_bytes


def build_providers(case, names: list[str]) -> tuple[dict, dict]:
    """({name: Built}, {name: why it is skipped}) for one layer case."""
    built, skipped = {}, {}
    for name in names:
        try:
            built[name] = PROVIDERS[name](case)
        except Unavailable as exc:
            skipped[name] = str(exc)
    return built, skipped


def gpu_inputs(opts: Options, shape, m: int, l2_bytes: int) -> tuple[list, list]:
    """Rotated (x, dy) copies for one shape and M on the GPU."""
    e = torch.finfo(opts.torch_dtype).bits // 8
    copies = copies_needed((m * shape.k + m * shape.n) * e, l2_bytes)
    return make_inputs(m, shape.k, shape.n, opts.torch_dtype, "cuda", copies)


def measure_row(opts: Options, env: dict, shape, rank: int, m: int, mode: str, name: str,
                built: dict, skipped: dict, xs: list, dys: list) -> dict:
    """One provider in one mode, as a CSV row; failures land in its 'status', not raised."""
    from ..launch.dispatch import forced

    row = {**env, **opts.config(), "shape": shape.name, "m": m, "n": shape.n, "k": shape.k,
           "rank": rank, "mode": mode, "provider": name, "base_path": "", "status": "ok"}
    if name in skipped:
        row["status"] = "skipped: " + skipped[name]
        return row
    try:
        with forced(getattr(built[name], "base_path", None)):
            t = measure(built[name], mode, xs, dys, opts.warmup_ms, opts.rep_ms)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                   peak_mib=t.peak_mib,
                   base_path=base_path_of(built[name], name, shape, m, mode, opts.torch_dtype))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as exc:  # keep going; the row says what happened
        row["status"] = f"error: {type(exc).__name__}: {exc}"
    return row


def run_gpu(opts: Options) -> int:
    from tqdm import tqdm

    device_name, peak, env, l2_bytes = gpu_info()
    opts.say(f"GPU: {device_name}; " + (
        f"datasheet peak {peak.tflops:.1f} TFLOP/s, {peak.gbs:g} GB/s" if peak
        else "not in the GPU table (fastlora/gpus.py): % of peak left blank"))
    opts.say(backend.describe("cuda") + "; versions: " + ", ".join(
        f"{k} {env[k]}" for k in ("torch", "cuda", "triton", "bitsandbytes", "peft")))
    total = len(opts.shapes) * len(opts.ranks) * len(opts.ms) * len(opts.modes) \
        * len(opts.providers)
    rows = []
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr)
    for shape in opts.shapes:
        for rank in opts.ranks:
            built, skipped = build_providers(opts.case(1, shape, rank), opts.providers)
            for name, why in skipped.items():
                bar.write(f"{name}: skipped for {shape.name} - {why}")
            for m in opts.ms:
                xs, dys = gpu_inputs(opts, shape, m, l2_bytes)
                for mode in opts.modes:
                    for name in opts.providers:
                        bar.set_postfix_str(f"{shape.name} M={m} r={rank} {mode} {name}")
                        rows.append(measure_row(opts, env, shape, rank, m, mode, name, built,
                                                skipped, xs, dys))
                        if rows[-1]["status"].startswith("error"):
                            bar.write(f"{name} failed on {shape.name} M={m} r={rank} {mode}: "
                                      f"{rows[-1]['status']}")
                        bar.update(1)
                del xs, dys
            del built
    bar.close()
    derive(rows, opts, peak)
    write_gpu_results(opts, rows)
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


def derive(rows: list[dict], opts: Options, peak) -> None:
    """Per row: speedup vs the baseline, achieved TFLOP/s and GB/s (the layer's useful FLOPs
    and compulsory bytes over the measured median: the same numerator for every provider) and
    their share of the datasheet peak."""
    nan = float("nan")
    medians = {(r["shape"], r["m"], r["rank"], r["mode"]): r.get("median_ms")
               for r in rows if r["provider"] == BASELINE}
    for r in rows:
        dims = opts.dims(r["m"], shape_table.SHAPES[r["shape"]], r["rank"])
        ms = r.get("median_ms")
        if ms is None:
            r.update(median_ms=nan, p20_ms=nan, p80_ms=nan, peak_mib=nan)
            ms = nan
        base = medians.get((r["shape"], r["m"], r["rank"], r["mode"])) or nan
        tflops = model.layer_flops(r["mode"], dims) / (ms * 1e-3) / 1e12
        gbs = model.layer_bytes(r["mode"], dims) / (ms * 1e-3) / 1e9
        r.update({f"speedup_vs_{BASELINE}": base / ms, "tflops": tflops, "gbs": gbs,
                  "pct_peak_tflops": 100 * tflops / peak.tflops if peak else nan,
                  "pct_peak_gbs": 100 * gbs / peak.gbs if peak else nan})


def write_gpu_results(opts: Options, rows: list[dict]) -> None:
    """results.csv (appended), results.md and speedup_<mode>_r<rank>.png in opts.out."""
    if not rows:
        return
    report.append_csv(os.path.join(opts.out, "results.csv"), rows)
    first = rows[0]
    head = (f"# fastlora bench on {first['gpu']}\n\n{first['timestamp']}; torch {first['torch']}"
            f" (CUDA {first['cuda']}), triton {first['triton']}, bitsandbytes "
            f"{first['bitsandbytes']}, peft {first['peft']}, fastlora {first['fastlora']}; "
            f"{opts.dtype}, {opts.quant_type}, blocksize {opts.blocksize}, double quant "
            f"{opts.double_quant}.\n\nTimes from triton.testing.do_bench (CUDA events, L2 "
            "flushed, inputs rotated). TFLOP/s and GB/s: the layer's useful FLOPs and "
            "compulsory bytes over the median, so they rank providers like the times do.\n")
    sections = [head]
    for mode in opts.modes:
        part = [r for r in rows if r["mode"] == mode]
        sections.append(f"## {mode}\n\n" + report.markdown_table(part, _RESULT_COLUMNS))
        for rank in opts.ranks:
            ranked = [r for r in part if r["rank"] == rank and r["provider"] != BASELINE]
            name = f"speedup_{mode}_r{rank}.png"
            report.plot_speedup(ranked, os.path.join(opts.out, name),
                                f"{first['gpu']}: {mode}, rank {rank}, {opts.dtype} (measured)",
                                f"speedup_vs_{BASELINE}", BASELINE)
    with open(os.path.join(opts.out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(sections) + "\n")
    opts.say(report.text_table(rows, _RESULT_COLUMNS))
    opts.say(f"wrote results.csv (appended), results.md and speedup_*.png to {opts.out}")


# ----------------------------------------------------------------------------- no GPU

_SMOKE_COLUMNS = [("provider", "provider"), ("shape", "shape"), ("m", "M"), ("n", "N"),
                  ("k", "K"), ("rank", "r"), ("dtype", "dtype"), ("modes", "modes run"),
                  ("worst", "worst output"), ("max_err", "max err"), ("bound", "bound"),
                  ("status", "status")]


def run_smoke(opts: Options) -> int:
    """Every provider, forward + backward on tiny shapes, each output compared with the float64
    reference (fastlora.numerics bound); then each timing mode's callable once. Returns the
    exit code. No timings: this proves the suite runs, not how fast."""
    from ..launch.dispatch import forced

    opts.say(f"\n== smoke pass ({backend.describe('cpu')}) ==")
    dtype = opts.torch_dtype
    rows, failed = [], False
    stack = contextlib.ExitStack()
    for shape in shape_table.SMOKE_SHAPES:
        # K a multiple of the blocksize: the unfused providers call bitsandbytes' CPU
        # dequantize, which mis-scales blocks that straddle rows (bnb 0.50.2; test_format.py)
        shape = dataclasses.replace(shape, k=-(-shape.k // opts.blocksize) * opts.blocksize)
        case = opts.case(shape_table.SMOKE_M, shape, shape_table.SMOKE_RANK)
        dy = torch.randn(shape_table.SMOKE_M, shape.n,
                         generator=torch.Generator().manual_seed(7)).to(dtype)
        truth, baseline = reference_pair(case, dtype, dy)
        for name in opts.providers:
            row = {"provider": name, "shape": shape.name, "m": shape_table.SMOKE_M,
                   "n": shape.n, "k": shape.k, "rank": shape_table.SMOKE_RANK,
                   "dtype": opts.dtype, "modes": "", "worst": "", "max_err": float("nan"),
                   "bound": float("nan")}
            try:
                built = PROVIDERS[name](case)
                # fastlora_fused / _dequant: their base path, forward and backward alike
                stack.enter_context(forced(built.base_path))
                x = case.x.detach().clone().requires_grad_(True)
                y = built.fn(x)
                y.backward(dy)
                outputs = {"y": y.detach(), "dx": x.grad, "dA": built.params[0].grad,
                           "dB": built.params[1].grad}
                checks = [compare(k, v, truth[k], baseline[k], dtype) for k, v in outputs.items()]
                row.update(report.smoke_result(checks))
                xs, dys = make_inputs(shape_table.SMOKE_M, shape.k, shape.n, dtype, "cpu", 2)
                for mode in opts.modes:
                    mode_callable(built, mode, xs, dys)()
                row["modes"] = ",".join(opts.modes)
            except Unavailable as exc:
                row["status"] = f"skipped: {exc}"
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {exc}"
            finally:
                stack.close()
            failed |= not (row["status"] == "ok" or row["status"].startswith("skipped"))
            rows.append(row)
    opts.say(report.text_table(rows, _SMOKE_COLUMNS))
    with open(os.path.join(opts.out, "smoke.md"), "w", encoding="utf-8") as fh:
        fh.write("# fastlora bench smoke pass (no GPU)\n\nCorrectness only: every provider's "
                 "forward and backward on tiny shapes against the float64 reference, bound "
                 "2 x plain-PyTorch error + 1 ulp (fastlora.numerics). No timings.\n\n"
                 + report.markdown_table(rows, _SMOKE_COLUMNS) + "\n")
    opts.say("smoke pass: " + ("FAILED (see status)" if failed else "every provider ran and "
                               "matched the float64 reference (or was skipped, as shown)"))
    return 1 if failed else 0


def modelled_rows(opts: Options, ceilings=None) -> list[dict]:
    """One row per GPU x shape x M x rank x mode x modelled provider (model.modelled_seconds).

    ceilings: {GPU name: {kernel: ceiling}} (modelled_ceilings' first answer), or one
    {kernel: ceiling} dict for every GPU; None: modelled_ceilings(opts) compiles them."""
    if ceilings is None:
        ceilings = modelled_ceilings(opts)[0]
    rows = []
    providers = [p for p in opts.providers if p in model.PROVIDER_STEPS]
    for gpu in opts.gpus:
        peak = peak_named(gpu)
        mine = ceilings.get(gpu, {}) if set(ceilings) & set(model.GPU_ARCHS) else ceilings
        for shape in opts.shapes:
            for rank in opts.ranks:
                for m in opts.ms:
                    d = opts.dims(m, shape, rank)
                    for mode in opts.modes:
                        times = {p: model.modelled_seconds(model.steps(p, mode, d), peak, mine)
                                 for p in model.PROVIDER_STEPS}
                        pick = " ".join(f"{role}={path}" for role, path in
                                        model.expected_pick(mode, d, peak, mine).items())
                        for p in providers:
                            st = model.steps(p, mode, d)
                            rows.append({
                                "gpu": gpu, **opts.config(), "shape": shape.name, "m": m,
                                "n": shape.n, "k": shape.k, "rank": rank, "mode": mode,
                                "provider": p, "kernels": len(st),
                                "modelled_gflop": sum(s.flops for s in st) / 1e9,
                                "modelled_mb": sum(s.bytes for s in st) / 1e6,
                                "modelled_us": times[p] * 1e6,
                                f"modelled_speedup_vs_{BASELINE}": times[BASELINE] / times[p],
                                "modelled_pick": pick,
                                "modelled_at": _basis(p, st, mine)})
    return rows


def _basis(provider: str, st: list, ceilings: dict) -> str:
    """What a modelled row's time assumes (its CSV column 'modelled_at')."""
    peer = (f"roofline at {model.PEER_GEMM_EFFICIENCY:.2f} tensor peak / "
            f"{model.PEER_BANDWIDTH_EFFICIENCY:.2f} bandwidth (assumed)")
    used = list(dict.fromkeys(s.kernel for s in st if s.kernel is not None))
    if not used:
        return peer
    text = "hot-loop ceilings: " + " ".join(
        f"{k.strip('_')}={ceilings[k]:.2f}" if k in ceilings else f"{k.strip('_')}=unmodelled"
        for k in used)
    if any(s.kernel is None for s in st):  # fastlora_dequant: cuBLAS runs the base product
        text += f"; cuBLAS: {peer}"
    return text


def _pivot(rows: list[dict], providers: list[str]) -> list[dict]:
    """(shape, M) rows with one 'µs (x speedup)' column per provider."""
    table: dict = {}
    for r in rows:
        entry = table.setdefault((r["shape"], r["m"]), {"shape": r["shape"], "m": r["m"],
                                                        "pick": r["modelled_pick"]})
        entry[r["provider"]] = (f"{r['modelled_us']:.1f} "
                                f"({r[f'modelled_speedup_vs_{BASELINE}']:.2f}x)")
    return list(table.values())


def gpu_slug(gpu: str, selected) -> str:
    """A GPU's name in file names: its first word ('h100'), or all of its words when another
    selected GPU shares that first word ('h100_pcie')."""
    first = gpu.split()[0].lower()
    if sum(g.split()[0].lower() == first for g in selected) > 1:
        return "_".join(gpu.lower().split())
    return first


def run_modelled(opts: Options, report_rows=None) -> None:
    """The modelled table (modelled.md, modelled.csv, plots). report_rows: the compile
    report's rows when already computed (their ceilings are used; nothing is recompiled)."""
    ceilings, failed = modelled_ceilings(opts, report_rows)
    rows = modelled_rows(opts, ceilings)
    providers = [p for p in opts.providers if p in model.PROVIDER_STEPS]
    columns = [("shape", "shape"), ("m", "M")] + [
        (p, f"{p} modelled us (x vs {BASELINE})") for p in providers] + [
        ("pick", "expected base path (fastlora vs fastlora_dequant)")]
    note = modelled_note(opts, ceilings, failed)
    sections = [f"# fastlora bench: modelled table (no GPU was available)\n\n{note}"]
    opts.say(f"\n== modelled table ==\n{note}")
    if BASELINE not in providers:
        opts.say(f"(speedups are against {BASELINE}, modelled even though not selected)")
    for gpu in opts.gpus:
        for rank in opts.ranks:
            for mode in opts.modes:
                part = [r for r in rows if r["gpu"] == gpu and r["rank"] == rank
                        and r["mode"] == mode]
                title = f"{gpu}, rank {rank}, {mode}, {opts.dtype} (modelled)"
                sections.append(f"## {title}\n\n" + report.markdown_table(
                    _pivot(part, providers), columns))
                if mode == opts.modes[-1]:
                    opts.say(f"\n{title}\n" + report.text_table(_pivot(part, providers),
                                                                columns))
                slug = gpu_slug(gpu, opts.gpus)
                report.plot_speedup(
                    [r for r in part if r["provider"] != BASELINE],
                    os.path.join(opts.out, f"modelled_speedup_{slug}_{mode}_r{rank}.png"),
                    f"{title}: a model, not a measurement", f"modelled_speedup_vs_{BASELINE}",
                    BASELINE)
    report.append_csv(os.path.join(opts.out, "modelled.csv"), rows)
    with open(os.path.join(opts.out, "modelled.md"), "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(sections) + "\n")
    opts.say(f"wrote smoke.md, modelled.md, modelled.csv and modelled_speedup_*.png to "
             f"{opts.out}")


# ----------------------------------------------------------------------------- compile report

def compile_rows(archs=("sm_80", "sm_90"), kernels=None, configs=None,
                 record=None) -> list[dict]:
    """The compile report of the shipped configs (every one unless kernels / configs restrict
    them): rows from the committed compile record where their keys match, compiled on this
    machine otherwise (fastlora/compilerecord.py; record=False or FASTLORA_COMPILE_RECORD=0
    compiles all)."""
    from ..compilerecord import recorded_report

    return recorded_report(archs, kernels, configs=configs, record=record)


def write_compile_report(out: str | None, say: Callable[[str], None] = print,
                         archs=("sm_80", "sm_90"), kernels=None, rows=None,
                         configs=None, record=None) -> list[str]:
    """Print compile_rows(archs, kernels, configs, record) (and write compile_report.md into `out`
    when given); returns its problems (spills, tl.dot without tensor-core instructions,
    32-bit-only addressing of a large tensor). rows: that report, when already computed."""
    from ..compilecheck import format_table, problems

    if rows is None:
        rows = compile_rows(archs, kernels, configs, record)
    found = problems(rows)
    text = format_table(rows)
    summary = ("no spills; tensor-core instructions wherever tl.dot is used (none, as "
               "intended, in full-precision 'ieee' fp32 configs); 64-bit addressing "
               "of every tensor that can pass 2^31 elements" if not found
               else "PROBLEMS:\n" + "\n".join(found))
    recorded = sum(r.get("source") == "record" for r in rows)
    where = (f"{len(rows) - recorded} rows compiled on this machine, {recorded} read from the "
             "compile record (same kernel source, spec and toolchain; --compile compiles all)"
             if recorded else "compiled on this machine")
    say(f"\n== compile report ({', '.join(archs)}, {where}) ==\n{text}\n{summary}")
    if out is not None:
        with open(os.path.join(out, "compile_report.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# Compile report ({', '.join(archs)})\n\n```\n{text}\n```\n\n"
                     f"{summary}\n")
    return found
