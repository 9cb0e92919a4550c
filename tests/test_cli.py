"""The `fastlora` command end to end on this machine (subprocesses, small settings), and its
answer to bad input: one line on stderr, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest
import torch

from fastlora import cli

# what the commands print as their backend: kernels in the interpreter without a GPU
BACKEND_LINE = ("triton (compiled kernels)" if torch.cuda.is_available()
                else "triton (kernels in the Triton CPU interpreter)")


def fastlora(*args, timeout=600):
    """Run `python -m fastlora.cli ARGS` as a user would (the env of conftest: without a GPU
    the kernels run in the interpreter); returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "fastlora.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the smoke pass and modelled "
                    "table are what fastlora bench does without a GPU")
def test_bench_without_gpu(tmp_path):
    out = tmp_path / "bench"
    done = fastlora("bench", "--shapes", "llama3-8b.q_proj,qwen2.5-7b.k_proj", "--m", "1,4096",
                    "--modes", "full", "--out", str(out), "--no-compile-report")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "No CUDA GPU found" in done.stdout
    assert "MODELLED" in done.stdout and "H100 SXM" in done.stdout and "A100" in done.stdout
    for name in ("smoke.md", "modelled.md", "modelled.csv", "modelled_speedup_h100_full_r16.png",
                 "modelled_speedup_a100_full_r16.png"):
        assert (out / name).stat().st_size > 0, name
    csv_lines = (out / "modelled.csv").read_text().splitlines()
    assert csv_lines[0].startswith("gpu,dtype,quant_type,blocksize,double_quant,shape,m,")
    # GPUs x shapes x M x modelled providers (fastlora, fastlora_dequant, peft_bnb, dequant_mm,
    # reference)
    assert len(csv_lines) == 1 + 2 * 2 * 2 * 5
    assert "| qwen2.5-7b.k_proj | 4096 |" in (out / "modelled.md").read_text()


def test_compile_report(tmp_path):
    done = fastlora("compile-report", "--kernels", "_dequant_4bit_kernel", "--out",
                    str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "compile_report.md").read_text()
    assert "_dequant_4bit_kernel" in report and "sm_80" in report and "sm_90" in report
    assert "no spills" in done.stdout


def test_compile_report_json():
    import json

    from csrc_triton import all_compile_specs

    kernel = "_lora_bwd_da_kernel"
    done = fastlora("compile-report", "--kernels", kernel, "--archs", "sm_90", "--headline",
                    "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert rows and {row["arch"] for row in rows} == {"sm_90"}
    assert all(row["kernel"] == kernel and row["stack_bytes"] == 0 for row in rows)
    # --headline: exactly the configs with a ceiling target, which are not all of them
    specs = [s for s in all_compile_specs() if s.kernel == kernel and "sm_90" in s.archs]
    headline = sorted(s.config for s in specs if s.ceiling_target > 0)
    assert sorted(row["config"] for row in rows) == headline
    assert all(row["ceiling_target"] > 0 for row in rows) and len(headline) < len(specs)


def test_verify(tmp_path):
    done = fastlora("verify", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert BACKEND_LINE in done.stdout
    table = (tmp_path / "verify.md").read_text()
    for dtype in ("fp16", "bf16", "fp32"):
        for quant in ("nf4", "fp4"):
            assert any(f"| {dtype} |" in line and quant in line for line in table.splitlines())
    assert "FAIL" not in table and "ERROR" not in table
    assert (tmp_path / "verify.csv").read_text().count("\n") > 40


def test_demo(tmp_path):
    # two layers (the CPU preset's; the GPU preset has four): 14 LoRA layers
    done = fastlora("demo", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                    "--layers", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert BACKEND_LINE in done.stdout
    assert "14 layers fused" in done.stdout
    assert "tokens/s" in done.stdout and "peak memory" in done.stdout
    assert "-> OK" in done.stdout
    assert "logits vs the same model in float64" in done.stdout  # fastlora.numerics' rule
    assert "bound 2 x unpatched + 1 ulp" in done.stdout
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 1 + 3


def test_demo_trl(tmp_path):
    """--trl: the same fine-tuning also through TRL's SFTTrainer with FastLoRACallback; both
    loss curves in loss.csv (and loss.png)."""
    done = fastlora("demo", "--trl", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TRL SFTTrainer with fastlora.FastLoRACallback (14 layers fused): 2 steps" \
        in done.stdout
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,trl_sft_loss" and len(lines) == 1 + 2
    assert all(float(value) > 0 for line in lines[1:] for value in line.split(",")[1:])
    assert (tmp_path / "loss.png").stat().st_size > 0


def run_main(argv, capsys):
    """cli.main in-process: (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


BAD_INPUT = {
    "unknown shape": (["bench", "--shapes", "llama3-8b.qq_proj"], "unknown shape"),
    "M zero": (["bench", "--m", "16,0"], "must be >= 1"),
    "M negative": (["bench", "--m", "-4"], "must be >= 1"),
    "M not a number": (["bench", "--m", "lots"], "must be integers"),
    "unknown mode": (["bench", "--modes", "sideways"], "unknown mode"),
    "unknown provider": (["bench", "--providers", "turbo"], "unknown provider"),
    "bench output is a file": (["bench", "--out", "{file}/sub"], "cannot write to output folder"),
    "verify output is a file": (["verify", "--out", "{file}"], "cannot write to output folder"),
    "demo output is a file": (["demo", "--out", "{file}/x"], "cannot write to output folder"),
    "demo zero steps": (["demo", "--steps", "0"], "must be >= 1"),
    "demo odd width": (["demo", "--hidden", "100"], "multiple of 64"),
    # the check batch is drawn from the corpus' 681-byte held-out slice
    "demo seq-len over held-out": (["demo", "--seq-len", "700"], "--seq-len must be <= 680"),
    "demo seq-len over corpus": (["demo", "--seq-len", "7000"], "--seq-len must be <= 680"),
    "demo seed too large": (["demo", "--seed", str(2**70)], "--seed must be in 0..2**63-1"),
    "demo seed negative": (["demo", "--seed", "-1"], "--seed must be in 0..2**63-1"),
    "bench csv with other columns": (["bench", "--shapes", "llama3-8b.q_proj", "--m", "1",
                                      "--out", "{other_csv}", "--no-compile-report"],
                                     "holds rows with other columns"),
    "unknown arch": (["compile-report", "--archs", "sm_75"], "unknown arch"),
    "unknown kernel": (["compile-report", "--kernels", "_no_such_kernel"], "unknown kernel"),
    "unknown command": (["train"], "invalid choice"),
    "no command": ([], "required"),
}


@pytest.fixture
def other_csv(tmp_path):
    """A bench output folder whose results.csv and modelled.csv hold other columns (an older
    fastlora's, say): the run appends to one of them, so it must refuse before it starts."""
    folder = tmp_path / "old-bench"
    folder.mkdir()
    for name in ("results.csv", "modelled.csv"):
        (folder / name).write_text("gpu,shape,m,median_ms\nX,llama3-8b.q_proj,1,0.1\n")
    return str(folder)


@pytest.mark.quick
@pytest.mark.parametrize("argv, expected", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_is_one_line(argv, expected, a_file, other_csv, capsys):
    code, err = run_main([a.format(file=a_file, other_csv=other_csv) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert lines[0].startswith("fastlora"), err


@pytest.mark.parametrize("command", [["demo"], ["verify"], ["bench", "--m", "1"]])
def test_bad_backend_is_one_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLORA_BACKEND", "bogus")
    code, err = run_main(command + ["--out", str(tmp_path)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "FASTLORA_BACKEND must be one of" in lines[0], err
    assert lines[0].startswith(f"fastlora {command[0]}: error:"), err


def test_bench_csv_check_sees_the_columns_a_gpu_run_writes(tmp_path, monkeypatch):
    """On a GPU the pre-run check takes results.csv's columns from a row that skips its
    provider; a row that was measured must have the very same columns (faked GPU here)."""
    from fastlora.bench import report, shapes, suite
    from fastlora.bench.timing import Timing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(suite, "measure", lambda *a: Timing(1.0, 0.9, 1.1, 10.0))
    opts = suite.Options(shapes=shapes.select_shapes("llama3-8b.q_proj"), ms=(16,),
                         ranks=(16,), modes=("full",), providers=["fastlora"],
                         out=str(tmp_path))
    path, columns = suite.check_output_csv(opts)
    assert path == str(tmp_path / "results.csv")
    env = report.environment("NVIDIA H100 80GB HBM3")
    row = suite.measure_row(opts, env, opts.shapes[0], 16, 16, "full", "fastlora",
                            {"fastlora": None}, {}, [], [])
    suite.derive([row], opts, peak=None)
    assert row["status"] == "ok" and list(row) == columns


@pytest.mark.quick
def test_demo_fails_when_nothing_is_patched(tmp_path, capsys):
    """Rank 257 is past the fused kernels' limit, so fastlora.patch fuses no layer: the demo
    stops with one line and exit 1 instead of comparing PEFT with itself."""
    code, err = run_main(["demo", "--rank", "257", "--hidden", "320", "--steps", "1",
                          "--out", str(tmp_path)], capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlora demo: error: fastlora.patch "
                                                   "fused no layer"), err
    assert "LoRA rank above 256" in lines[0], err


def test_bad_input_in_a_real_process(tmp_path):
    done = fastlora("bench", "--m", "0", "--out", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "fastlora bench: error: M values (--m) must be >= 1, got 0"
