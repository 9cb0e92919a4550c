"""The Python side of benchmarks/gpu_check.sh: the preflight (can the GPU check run on this
machine?) and the one-screen summary of the bench run it makes.

    python -m fastlora.bench.gpu_check preflight      # GPU and versions, or one line and exit 1
    python -m fastlora.bench.gpu_check summary OUTDIR/results.csv

The preflight fails, with a one-line reason, when there is no CUDA GPU, when TRITON_INTERPRET
is set (the check times compiled kernels), on a GPU older than sm_80 (the bench runs bf16), when
triton, transformers, peft or bitsandbytes does not import, when one of them is outside
fastlora.support's range, and when bitsandbytes cannot quantize on the GPU.

The summary reads the latest run in results.csv (`fastlora bench` appends; one run's rows
share its timestamp) and prints, per shape and M, the median ms of fastlora, peft_bnb and
dequant_mm and fastlora's speedup over the other two, for each mode.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
from collections import defaultdict

import torch

from .. import __version__, backend, support
from . import report

COMPARED = ("fastlora", "peft_bnb", "dequant_mm")  # the bench's --providers in gpu_check.sh
MIN_CAPABILITY = (8, 0)


class PreflightError(RuntimeError):
    """The GPU check cannot run here; the message (one line) says why."""


def _import(name: str):
    return importlib.import_module(name)


def _reason(exc: BaseException) -> str:
    """'Type: first line of the message', for one-line errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _bnb_quantizes_on_gpu(bnb) -> None:
    """Raise when bitsandbytes imports but has no working CUDA 4-bit path (e.g. a CPU build)."""
    packed, _ = bnb.functional.quantize_4bit(torch.ones(64, 64, device="cuda",
                                                        dtype=torch.bfloat16),
                                             blocksize=64, quant_type="nf4")
    torch.cuda.synchronize()
    if not packed.is_cuda:
        raise RuntimeError(f"its 4-bit quantize returned a tensor on {packed.device}")


def preflight() -> list[str]:
    """Lines naming the GPU and the versions; PreflightError (one line) when the check cannot
    run here."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PreflightError(f"no CUDA GPU: torch.cuda.is_available() is False (torch "
                             f"{torch.__version__}, {build}); run this on an NVIDIA GPU")
    if backend.interpreter_active():
        raise PreflightError("TRITON_INTERPRET is set: the GPU check times compiled kernels, "
                             "not Triton's CPU interpreter; unset it")
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) < MIN_CAPABILITY:
        raise PreflightError(f"{props.name} is sm_{props.major}{props.minor}: the GPU check "
                             "needs sm_80 or newer (A100, H100, H200), for bf16 kernels")
    modules = {"torch": torch}
    for name in support.MINIMUM:
        if name in modules:
            continue
        try:
            modules[name] = _import(name)
        except Exception as exc:  # ImportError, or a library that fails while loading
            hint = (" (pip install bitsandbytes, or BNB_WHEEL=/path/to/bitsandbytes-*.whl)"
                    if name == "bitsandbytes" else f" (pip install '{name}')")
            raise PreflightError(f"{name} is not importable: {_reason(exc)}{hint}") from None
    versions = {name: getattr(module, "__version__", None) for name, module in modules.items()}
    found = support.problems(versions)
    if found:
        raise PreflightError("unsupported versions: " + "; ".join(found))
    try:
        _bnb_quantizes_on_gpu(modules["bitsandbytes"])
    except Exception as exc:
        raise PreflightError(f"bitsandbytes {versions['bitsandbytes']} imports but cannot "
                             f"quantize on the GPU: {_reason(exc)}") from None
    versions["torch"] += f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    versions["fastlora"] = __version__
    return [f"GPU: {props.name}, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB", table_row(props),
            "versions: " + ", ".join(f"{name} {v}" for name, v in versions.items())]


def table_row(props) -> str:
    """The GPU table's row this device is modelled with (fastlora/gpus.py) and the configs it
    runs: its compile target (by compute capability) and that target's config family."""
    from ..gpus import CONFIG_FAMILY, capability_arch, gpu_for_device, reference

    target = capability_arch(props.major, props.minor)
    gpu = gpu_for_device(props.name)
    which = (f"{gpu.name}" if gpu is not None
             else f"not in the table, modelled as {reference(target).name}")
    gpu = gpu or reference(target)
    return (f"table row: {which} ({gpu.arch}: {gpu.sms} SMs at {gpu.boost_clock_mhz} MHz, "
            f"{gpu.tflops:.0f} dense bf16 TFLOP/s, {gpu.dram_gbs:.0f} GB/s, "
            f"{gpu.smem_per_block_kib} KiB shared memory a block); configs: {target}, "
            f"the {CONFIG_FAMILY[target]} lists")


# ----------------------------------------------------------------------------- summary

def latest_run(csv_path: str) -> list[dict]:
    """The rows of the latest run in a results.csv (ISO-8601 UTC timestamps sort as text)."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{csv_path} holds no rows")
    latest = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == latest]


def _median(row) -> float | None:
    """A row's median ms, None unless it was measured."""
    if row is None or row.get("status") != "ok":
        return None
    value = float(row["median_ms"])
    return value if math.isfinite(value) and value > 0 else None


def _ms_cell(row) -> str:
    if row is None:
        return "-"
    ms = _median(row)
    if ms is not None:
        return f"{ms:.3g}"
    status = row.get("status", "")
    return ("oom" if status == "out of memory" else "skip" if status.startswith("skipped")
            else "err")


def _x(other: float | None, fastlora: float | None) -> float | None:
    return other / fastlora if other is not None and fastlora is not None else None


def summary(csv_path: str) -> str:
    """The one-screen table of the latest run in `csv_path` (see the module doc)."""
    rows = latest_run(csv_path)
    by_point: dict = defaultdict(dict)  # (shape, rank, m) -> {(mode, provider): row}
    modes = []
    for r in rows:
        if r["provider"] in COMPARED:
            by_point[(r["shape"], int(r["rank"]), int(r["m"]))][(r["mode"], r["provider"])] = r
            if r["mode"] not in modes:
                modes.append(r["mode"])
    if not by_point:
        raise ValueError(f"{csv_path}: the latest run has no rows of {', '.join(COMPARED)}")
    prefixes = {shape.split(".")[0] for shape, _, _ in by_point}
    ranks = {rank for _, rank, _ in by_point}
    short = len(prefixes) == 1 and all("." in shape for shape, _, _ in by_point)
    speedups: dict = defaultdict(list)  # (mode, peer) -> [x]
    problems = []
    table = []
    for (shape, rank, m), cells in by_point.items():  # in run order: shape, rank, M
        label = shape.split(".", 1)[1] if short else shape
        line = {"shape": label + (f" r{rank}" if len(ranks) > 1 else ""), "m": m}
        for mode in modes:
            got = {p: cells.get((mode, p)) for p in COMPARED}
            line[f"{mode} ms"] = "/".join(_ms_cell(got[p]) for p in COMPARED)
            xs = []
            for peer in COMPARED[1:]:
                x = _x(_median(got[peer]), _median(got["fastlora"]))
                xs.append("-" if x is None else f"{x:.2f}")
                if x is not None:
                    speedups[(mode, peer)].append(x)
            line[f"{mode} x"] = "/".join(xs)
            problems += [f"{shape} M={m} {mode} {p}: {row['status']}" for p, row in got.items()
                         if row is not None and row["status"] != "ok"]
        table.append(line)
    first = rows[0]
    double = ", double quant" if first["double_quant"] == "True" else ""
    head = (f"{first['gpu']}, {first['timestamp']}: " + (f"{prefixes.pop()} " if short else "")
            + f"{first['dtype']} {first['quant_type']} blocksize {first['blocksize']}{double}, "
            f"rank {', '.join(map(str, sorted(ranks)))}")
    legend = ("ms: median fastlora/peft_bnb/dequant_mm; x: fastlora's speedup over "
              "peft_bnb/dequant_mm (> 1: faster)")
    columns = [("shape", "shape"), ("m", "M")]
    for mode in modes:
        columns += [(f"{mode} ms", f"{mode} ms"), (f"{mode} x", f"{mode} x")]
    lines = [head, legend, report.text_table(table, columns)]
    for peer in COMPARED[1:]:
        parts = [f"{mode} {geomean(speedups[(mode, peer)]):.2f}x" for mode in modes
                 if speedups[(mode, peer)]]
        lines.append(f"geometric mean speedup of fastlora over {peer}: "
                     + (", ".join(parts) if parts else "nothing measured"))
    if problems:
        lines.append(f"{len(problems)} rows not measured (see results.md): "
                     + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    return "\n".join(lines)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.bench.gpu_check",
                                     description="benchmarks/gpu_check.sh's preflight and "
                                     "summary")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight", help="check this machine can run the GPU check")
    summ = sub.add_parser("summary", help="one-screen table of the latest run in results.csv")
    summ.add_argument("csv")
    args = parser.parse_args(argv)
    try:
        print("\n".join(preflight()) if args.command == "preflight" else summary(args.csv))
    except (PreflightError, ValueError, OSError) as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
