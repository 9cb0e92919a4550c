"""benchmarks/gpu_check.sh and its Python side (fastlora.bench.gpu_check) without a GPU: each
preflight failure (GPU, interpreter, versions, bitsandbytes) with a faked machine, the script's
own failures as a subprocess, and the summary on a hand-written results.csv whose speedups are
worked out by hand below."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastlora.bench import gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
# the oldest supported release of each (fastlora.support), torch as a nightly pre-release
OLDEST = {"triton": "3.5.0", "transformers": "5.0.0", "peft": "0.18.0", "bitsandbytes": "0.50.0"}


@pytest.fixture
def machine(monkeypatch):
    """A faked H100 machine with the oldest supported versions; tests then break one thing.
    Returns the {name: version} of the imported modules, editable."""
    versions = dict(OLDEST)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: H100)
    monkeypatch.setattr(torch, "__version__", "2.9.0a0+git1234")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def fake_import(name):
        if isinstance(versions[name], Exception):
            raise versions[name]
        return SimpleNamespace(__version__=versions[name])
    monkeypatch.setattr(gpu_check, "_import", fake_import)
    monkeypatch.setattr(gpu_check, "_bnb_quantizes_on_gpu", lambda bnb: None)
    return versions


@pytest.mark.quick
def test_preflight_passes_on_a_supported_machine(machine):
    assert gpu_check.preflight() == [
        "GPU: NVIDIA H100 80GB HBM3, sm_90, 80 GiB",
        "table row: H100 SXM (sm_90: 132 SMs at 1830 MHz, 989 dense bf16 TFLOP/s, 3350 GB/s, "
        "227 KiB shared memory a block); configs: sm_90, the sm_90 lists",
        "versions: torch 2.9.0a0+git1234 (CUDA 12.8), triton 3.5.0, transformers 5.0.0, "
        "peft 0.18.0, bitsandbytes 0.50.0, fastlora 0.1.0"]


@pytest.mark.quick
def test_the_table_row_of_a_geforce_and_of_an_unknown_gpu():
    """An RTX 4090 (cc 8.9) is its own row and runs sm_89's configs of the sm_80 lists; a GPU
    the table does not know is modelled as its compile target's reference GPU."""
    rtx = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9)
    assert gpu_check.table_row(rtx) == (
        "table row: RTX 4090 (sm_89: 128 SMs at 2520 MHz, 165 dense bf16 TFLOP/s, 1008 GB/s, "
        "99 KiB shared memory a block); configs: sm_89, the sm_80 lists")
    odd = SimpleNamespace(name="NVIDIA Orin", major=8, minor=7)
    assert gpu_check.table_row(odd).startswith(
        "table row: not in the table, modelled as A10 (sm_86: 72 SMs")
    assert gpu_check.table_row(odd).endswith("configs: sm_86, the sm_80 lists")


def _fails(match: str):
    with pytest.raises(gpu_check.PreflightError, match=match) as info:
        gpu_check.preflight()
    assert "\n" not in str(info.value), "the reason must be one line"


@pytest.mark.quick
def test_preflight_without_a_gpu(machine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    _fails(r"^no CUDA GPU: torch.cuda.is_available\(\) is False \(torch 2.9.0a0\+git1234, "
           r"a CPU-only build\)")


def test_preflight_with_the_interpreter_on(machine, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _fails("^TRITON_INTERPRET is set: .* unset it$")


def test_preflight_on_an_old_gpu(machine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(
        name="Tesla T4", major=7, minor=5, total_memory=16 * 2**30))
    _fails("^Tesla T4 is sm_75: the GPU check needs sm_80 or newer")


def test_preflight_without_bitsandbytes(machine):
    machine["bitsandbytes"] = ModuleNotFoundError("No module named 'bitsandbytes'")
    _fails(r"^bitsandbytes is not importable: ModuleNotFoundError: No module named "
           r"'bitsandbytes' \(pip install bitsandbytes, or BNB_WHEEL=")


def test_preflight_with_a_library_that_fails_to_load(machine):
    machine["peft"] = RuntimeError("CUDA driver too old\n(details on a second line)")
    _fails(r"^peft is not importable: RuntimeError: CUDA driver too old \(pip install 'peft'\)$")


@pytest.mark.parametrize("name,version,needle", [
    ("peft", "0.17.1", "peft 0.17.1 "),
    ("triton", "3.10.0", "triton 3.10.0 "),   # the exclusive maximum
    ("bitsandbytes", "0.49.2", "bitsandbytes 0.49.2 "),
    ("torch", "2.8.0", "torch 2.8.0 "),
], ids=["peft-too-old", "triton-too-new", "bnb-too-old", "torch-too-old"])
def test_preflight_names_an_unsupported_version(machine, monkeypatch, name, version, needle):
    if name == "torch":
        monkeypatch.setattr(torch, "__version__", version)
    else:
        machine[name] = version
    with pytest.raises(gpu_check.PreflightError) as info:
        gpu_check.preflight()
    text = str(info.value)
    assert text.startswith("unsupported versions: ") and needle in text, text
    assert "\n" not in text and text.count(";") == 0, "exactly one problem, one line"


def test_preflight_when_bitsandbytes_cannot_use_the_gpu(machine, monkeypatch):
    def no_cuda(bnb):
        raise RuntimeError("bitsandbytes was compiled without GPU support")
    monkeypatch.setattr(gpu_check, "_bnb_quantizes_on_gpu", no_cuda)
    _fails(r"^bitsandbytes 0.50.0 imports but cannot quantize on the GPU: RuntimeError: "
           r"bitsandbytes was compiled without GPU support$")


# ----------------------------------------------------------------------------- summary

COLUMNS = ["gpu", "timestamp", "dtype", "quant_type", "blocksize", "double_quant", "shape", "m",
           "rank", "mode", "provider", "median_ms", "status"]
OLD, NEW = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"


def _write(path, points):
    """points: (timestamp, shape, m, mode, provider, median ms or None, status)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for ts, shape, m, mode, provider, ms, status in points:
            writer.writerow({"gpu": "NVIDIA H100 80GB HBM3", "timestamp": ts, "dtype": "bf16",
                             "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                             "shape": shape, "m": m, "rank": 16, "mode": mode,
                             "provider": provider,
                             "median_ms": "nan" if ms is None else ms, "status": status})


@pytest.mark.quick
def test_summary_of_the_latest_run_hand_checked(tmp_path):
    q = "llama3-8b.q_proj"
    points = [
        # an older run in the same (appended) CSV: must not show (M = 16 is in it only)
        (OLD, q, 16, "forward", "fastlora", 9.0, "ok"),
        (OLD, q, 16, "forward", "peft_bnb", 9.0, "ok"),
        # this run; ms fastlora / peft_bnb / dequant_mm, and by hand x = peer ms / fastlora ms
        (NEW, q, 1, "forward", "fastlora", 0.05, "ok"),     # 0.2 / 0.05 = 4.00
        (NEW, q, 1, "forward", "peft_bnb", 0.2, "ok"),      # 0.1 / 0.05 = 2.00
        (NEW, q, 1, "forward", "dequant_mm", 0.1, "ok"),
        (NEW, q, 1, "full", "fastlora", 0.2, "ok"),         # 0.5 / 0.2 = 2.50
        (NEW, q, 1, "full", "peft_bnb", 0.5, "ok"),         # 0.3 / 0.2 = 1.50
        (NEW, q, 1, "full", "dequant_mm", 0.3, "ok"),
        (NEW, q, 4096, "forward", "fastlora", 1.0, "ok"),   # 1.5 / 1.0 = 1.50
        (NEW, q, 4096, "forward", "peft_bnb", 1.5, "ok"),   # 1.25 / 1.0 = 1.25
        (NEW, q, 4096, "forward", "dequant_mm", 1.25, "ok"),
        (NEW, q, 4096, "full", "fastlora", 3.0, "ok"),      # 4.5 / 3.0 = 1.50
        (NEW, q, 4096, "full", "peft_bnb", 4.5, "ok"),
        (NEW, q, 4096, "full", "dequant_mm", None, "out of memory"),   # no speedup
        (NEW, q, 4096, "full", "reference", 7.0, "ok"),     # not one of the three: ignored
    ]
    _write(tmp_path / "results.csv", points)
    text = gpu_check.summary(str(tmp_path / "results.csv"))
    lines = text.splitlines()
    assert lines[0] == ("NVIDIA H100 80GB HBM3, 2026-02-01T00:00:00+00:00: llama3-8b bf16 nf4 "
                        "blocksize 64, double quant, rank 16")
    rows = {line.split()[1]: line.split() for line in lines if line.startswith("q_proj ")}
    assert set(rows) == {"1", "4096"}, text
    assert rows["1"] == ["q_proj", "1", "0.05/0.2/0.1", "4.00/2.00", "0.2/0.5/0.3", "2.50/1.50"]
    assert rows["4096"] == ["q_proj", "4096", "1/1.5/1.25", "1.50/1.25", "3/4.5/oom", "1.50/-"]
    # geometric means: forward vs peft sqrt(4.00 * 1.50) = 2.449; full sqrt(2.50 * 1.50) =
    # 1.936; vs dequant_mm forward sqrt(2.00 * 1.25) = 1.581, full 1.50 alone
    assert "geometric mean speedup of fastlora over peft_bnb: forward 2.45x, full 1.94x" in lines
    assert "geometric mean speedup of fastlora over dequant_mm: forward 1.58x, full 1.50x" \
        in lines
    assert lines[-1].startswith("1 rows not measured")
    assert "llama3-8b.q_proj M=4096 full dequant_mm: out of memory" in lines[-1]


def test_summary_of_the_gpu_check_grid_fits_one_screen(tmp_path):
    """3 shapes x 5 M x 3 modes x 3 providers (what gpu_check.sh measures): one row per
    shape and M, at most 40 lines."""
    shapes = ["llama3-8b.q_proj", "llama3-8b.gate_proj", "llama3-8b.down_proj"]
    points = [(NEW, s, m, mode, p, 1.0 + i, "ok") for s in shapes for m in (1, 16, 512, 4096, 8192)
              for mode in ("forward", "backward", "full")
              for i, p in enumerate(("fastlora", "peft_bnb", "dequant_mm"))]
    _write(tmp_path / "results.csv", points)
    lines = gpu_check.summary(str(tmp_path / "results.csv")).splitlines()
    data = [line for line in lines if line.split()[0] in ("q_proj", "gate_proj", "down_proj")]
    assert len(data) == 15 and len(lines) <= 40, "\n".join(lines)
    assert all(line.split()[2:] == ["1/2/3", "2.00/3.00"] * 3 for line in data), data
    # in run order, the model prefix (one model) left to the title
    assert [line.split()[0] for line in data] == [s.split(".")[1] for s in shapes
                                                  for _ in range(5)]
    assert max(len(line) for line in lines) <= 120


def test_summary_reads_what_the_bench_writes(tmp_path, monkeypatch):
    """A results.csv written by the suite's own GPU row code (fastlora.bench.suite, timings
    faked: fastlora 1 ms, peft_bnb 2 ms, dequant_mm 1.5 ms): the summary finds its columns."""
    from fastlora.bench import report, shapes, suite
    from fastlora.bench.timing import Timing

    ms = {"fastlora": 1.0, "peft_bnb": 2.0, "dequant_mm": 1.5}
    monkeypatch.setattr(suite, "measure", lambda built, *a: Timing(ms[built], 0, 0, 0.0))
    shape = shapes.SHAPES["llama3-8b.down_proj"]
    opts = suite.Options(shapes=[shape], ms=(512,), ranks=(16,), modes=("backward",),
                         providers=list(ms), out=str(tmp_path))
    env = {"gpu": "NVIDIA A100-SXM4-80GB", "timestamp": NEW}
    rows = [suite.measure_row(opts, env, shape, 16, 512, "backward", name, {n: n for n in ms},
                              {}, [], []) for name in ms]
    suite.derive(rows, opts, peak=None)
    report.append_csv(str(tmp_path / "results.csv"), rows)
    lines = gpu_check.summary(str(tmp_path / "results.csv")).splitlines()
    assert lines[0].startswith("NVIDIA A100-SXM4-80GB, 2026-02-01T00:00:00+00:00: llama3-8b "
                               "bf16 nf4 blocksize 64, double quant, rank 16")
    # 2 / 1 = 2.00 over peft_bnb, 1.5 / 1 = 1.50 over dequant_mm
    assert ["down_proj", "512", "1/2/1.5", "2.00/1.50"] in [line.split() for line in lines]


def test_summary_of_a_csv_without_the_providers(tmp_path):
    _write(tmp_path / "results.csv", [(NEW, "llama3-8b.q_proj", 1, "full", "reference", 1.0,
                                       "ok")])
    with pytest.raises(ValueError, match="no rows of fastlora, peft_bnb, dequant_mm"):
        gpu_check.summary(str(tmp_path / "results.csv"))


# ----------------------------------------------------------------------------- the script

def _script(*args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_script_without_outdir_prints_usage():
    done = _script()
    assert done.returncode == 2
    assert done.stderr.startswith("usage: ") and "OUTDIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: checks the failure on a "
                    "machine without a GPU")
def test_script_fails_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    done = _script(str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU: torch.cuda.is_available() is False (torch "
        f"{torch.__version__}, a CPU-only build); run this on an NVIDIA GPU"], done.stderr
    assert sorted(p.name for p in out.iterdir()) == [], "nothing ran after the preflight"


def test_script_names_missing_bitsandbytes(tmp_path):
    """bitsandbytes hidden from the interpreter (a sitecustomize that blocks its import):
    without BNB_WHEEL the script says what to install; with a wheel path that does not exist,
    it says so. Nothing is installed."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'bitsandbytes':\n"
        "            raise ModuleNotFoundError(\"No module named 'bitsandbytes'\")\n"
        "sys.meta_path.insert(0, _Hide())\n")
    pythonpath = str(hide) + os.pathsep + os.environ.get("PYTHONPATH", "")
    done = _script(str(tmp_path / "out"), env_extra={"PYTHONPATH": pythonpath})
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == ("gpu_check: bitsandbytes is not installed: pip install "
                                   "bitsandbytes, or set BNB_WHEEL=/path/to/bitsandbytes-*.whl")
    missing = tmp_path / "no-such.whl"
    done = _script(str(tmp_path / "out"), env_extra={"PYTHONPATH": pythonpath,
                                                     "BNB_WHEEL": str(missing)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == f"gpu_check: BNB_WHEEL={missing}: no such file"
