"""The `fastlora` command end to end on this machine (subprocesses, small settings), and its
answer to bad input: one line on stderr, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest
import torch

from fastlora import cli

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="these runs use the no-GPU paths and CPU-sized settings")


def fastlora(*args, timeout=600):
    """Run `python -m fastlora.cli ARGS` as a user would (the env of conftest: the kernels run
    in the interpreter); returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "fastlora.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


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
    assert len(csv_lines) == 1 + 2 * 2 * 2 * 4  # GPUs x shapes x M x modelled providers
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

    done = fastlora("compile-report", "--kernels", "_dequant_4bit_kernel", "--archs", "sm_90",
                    "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert rows and {row["arch"] for row in rows} == {"sm_90"}
    assert all(row["kernel"] == "_dequant_4bit_kernel" and row["stack_bytes"] == 0
               for row in rows)


def test_verify(tmp_path):
    done = fastlora("verify", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "triton (kernels in the Triton CPU interpreter)" in done.stdout
    table = (tmp_path / "verify.md").read_text()
    for dtype in ("fp16", "bf16", "fp32"):
        for quant in ("nf4", "fp4"):
            assert any(f"| {dtype} |" in line and quant in line for line in table.splitlines())
    assert "FAIL" not in table and "ERROR" not in table
    assert (tmp_path / "verify.csv").read_text().count("\n") > 40


def test_demo(tmp_path):
    done = fastlora("demo", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--out",
                    str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "triton (kernels in the Triton CPU interpreter)" in done.stdout
    assert "14 layers fused" in done.stdout
    assert "tokens/s" in done.stdout and "peak memory" in done.stdout
    assert "-> OK" in done.stdout
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 1 + 3


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
    "unknown arch": (["compile-report", "--archs", "sm_75"], "unknown arch"),
    "unknown kernel": (["compile-report", "--kernels", "_no_such_kernel"], "unknown kernel"),
    "unknown command": (["train"], "invalid choice"),
    "no command": ([], "required"),
}


@pytest.mark.parametrize("argv, expected", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_is_one_line(argv, expected, a_file, capsys):
    code, err = run_main([a.format(file=a_file) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert lines[0].startswith("fastlora"), err


def test_bad_input_in_a_real_process(tmp_path):
    done = fastlora("bench", "--m", "0", "--out", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "fastlora bench: error: M values (--m) must be >= 1, got 0"
