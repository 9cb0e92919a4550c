"""The benchmark suite's pieces: the modelled cost formulas on a hand-checked case, the shape
and option parsers, the peak table, and the no-GPU smoke pass of every provider."""

import pytest
import torch

from fastlora.bench import model, peaks, shapes, suite, timing
from fastlora.bench.peaks import Peak
from fastlora.bench.providers import PROVIDERS, select_providers

# The hand-checked layer: M=4 tokens, N=8 out, K=64 in, rank 2, bf16 (2 bytes), NF4 with
# blocksize 64 and double quantisation, no bias.
D = model.Dims(m=4, n=8, k=64, r=2, e=2, bias=False, blocksize=64, double_quant=True)
# Tensor sizes in bytes, written out:
X = 4 * 64 * 2          # x  [M, K]   = 512
Y = 4 * 8 * 2           # y  [M, N]   = 64   (dy is the same size)
U = 4 * 2 * 2           # U  [M, r]   = 16
A = 2 * 64 * 2          # A  [r, K]   = 256
B = 8 * 2 * 2           # B  [N, r]   = 32
W16 = 8 * 64 * 2        # dense W [N, K] in bf16 = 1024
# 4-bit W: 8*64 = 512 values -> 256 packed bytes; 512 / 64 = 8 blocks -> 8 uint8 absmax codes;
# ceil(8 / 256) = 1 fp32 second-level absmax -> 4 bytes. 256 + 8 + 4 = 268.
W4 = 256 + 8 + 4


def test_weight_bytes_hand_checked():
    assert model.weight_bytes(D) == W4 == 268
    # without double quantisation: 256 packed + 8 fp32 absmax (32 bytes) = 288
    no_dq = model.Dims(4, 8, 64, 2, 2, False, 64, False)
    assert model.weight_bytes(no_dq) == 256 + 8 * 4 == 288


def test_layer_flops_hand_checked():
    # forward: x W^T 2*4*8*64 = 4096, x A^T 2*4*2*64 = 1024, U B^T 2*4*8*2 = 128
    assert model.layer_flops("forward", D) == 4096 + 1024 + 128 == 5248
    # backward: dy W 2*4*64*8 = 4096; dy B and dy^T U 2*4*2*8 = 128 each;
    # dU^T x and dU A 2*4*2*64 = 1024 each
    assert model.layer_flops("backward", D) == 4096 + 2 * 128 + 2 * 1024 == 6400
    assert model.layer_flops("full", D) == 5248 + 6400


def test_layer_bytes_hand_checked():
    # forward reads W, x, A, B and writes y: 268 + 512 + 256 + 32 + 64
    assert model.layer_bytes("forward", D) == W4 + X + A + B + Y == 1132
    # backward reads dy, x, W, A, B and writes dx, dA, dB
    assert model.layer_bytes("backward", D) == Y + X + W4 + A + B + X + A + B == 1932


def test_provider_steps_hand_checked():
    fused = model.steps("fastlora", "forward", D)
    # U = x A^T: reads x and A, writes U; then the fused pass reads x, W, U, B and writes y
    assert [s.bytes for s in fused] == [X + A + U, X + W4 + U + B + Y] == [784, 892]
    assert [s.flops for s in fused] == [1024, 4096 + 128]
    fused_bwd = model.steps("fastlora", "backward", D)
    # dU/dB: reads dy, B, U, writes dU, dB; dA/dx_lora: reads dU, x, A, writes dA, dx;
    # dx += dy W: reads dy, W, dx and writes dx
    assert [s.bytes for s in fused_bwd] == [Y + B + U + U + B, U + X + A + A + X,
                                            Y + W4 + X + X] == [160, 1552, 1356]
    peft = model.steps("peft_bnb", "forward", D)
    # dequantize (W4 in, W16 out), matmul, PEFT's clone, lora_A, lora_B, * scaling, add
    assert [s.bytes for s in peft] == [W4 + W16, W16 + X + Y, 2 * Y, X + A + U, U + B + Y,
                                       2 * Y, 3 * Y] == [1292, 1600, 128, 784, 112, 128, 192]
    buffered = model.steps("dequant_mm", "forward", D)
    # dequantize into the buffer, x W^T, U = x A^T, y += s U B^T (reads and writes y)
    assert sum(s.bytes for s in buffered) == (W4 + W16) + (W16 + X + Y) + (X + A + U) \
        + (U + B + 2 * Y) == 3852


@pytest.mark.parametrize("mode", shapes.MODES)
@pytest.mark.parametrize("provider", list(model.PROVIDER_STEPS))
def test_every_provider_counts_the_layer_flops(provider, mode):
    """The providers differ in traffic, not in the matmuls they do."""
    for d in (D, model.Dims(37, 96, 160, 16, 2, True, 64, False)):
        assert sum(s.flops for s in model.steps(provider, mode, d)) == model.layer_flops(mode, d)


def test_roofline_hand_checked():
    # a GPU doing 1e6 FLOP/s and 1e6 B/s: each kernel takes max(flops, bytes) microseconds
    slow = Peak("unit", tflops=1e-6, gbs=1e-3)
    fused = model.roofline_seconds(model.steps("fastlora", "forward", D), slow)
    assert fused == pytest.approx((max(1024, 784) + max(4224, 892)) * 1e-6)  # 5248 us
    peft = model.roofline_seconds(model.steps("peft_bnb", "forward", D), slow)
    # dequant 1292 + matmul max(4096, 1600) + clone 128 + lora_A max(1024, 784)
    # + lora_B max(128, 112) + scale 128 + add 192 = 6988 us
    assert peft == pytest.approx(6988e-6)


def test_modelled_rows_are_labelled_and_relative_to_peft(tmp_path):
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(1, 4096), ranks=(16,),
                         modes=("full",), providers=["fastlora", "peft_bnb"], out=str(tmp_path))
    rows = suite.modelled_rows(opts)
    assert len(rows) == len(peaks.MODELLED_GPUS) * 2 * 2
    for row in rows:
        assert all(k.startswith("modelled_") for k in row if k.endswith(("us", "mb", "gflop")))
        if row["provider"] == "peft_bnb":
            assert row["modelled_speedup_vs_peft_bnb"] == 1.0
        else:  # one decode token: the fused path reads the 4-bit weight once, not W16 twice
            assert row["modelled_speedup_vs_peft_bnb"] > (3.0 if row["m"] == 1 else 1.0)


def test_peak_lookup_by_device_name():
    assert peaks.peak_for("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert peaks.peak_for("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert peaks.peak_for("NVIDIA A100-SXM4-80GB").name == "A100 SXM 80GB"
    assert peaks.peak_for("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
    assert peaks.peak_for("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert peaks.peak_for("NVIDIA L40S").name == "L40S"
    assert peaks.peak_for("Some Future GPU") is None


def test_shape_selection():
    assert [s.name for s in shapes.select_shapes("llama3-8b.q_proj,llama3-8b")][:2] == \
        ["llama3-8b.q_proj", "llama3-8b.k_proj"]
    assert len(shapes.select_shapes("all")) == 4 * 7
    qwen_q = shapes.SHAPES["qwen2.5-7b.q_proj"]
    assert (qwen_q.n, qwen_q.k, qwen_q.bias) == (3584, 3584, True)
    down = shapes.SHAPES["llama2-70b.down_proj"]
    assert (down.n, down.k) == (8192, 28672)
    with pytest.raises(ValueError, match="unknown shape 'gpt9.q_proj'"):
        shapes.select_shapes("gpt9.q_proj")
    with pytest.raises(ValueError, match=">= 1"):
        shapes.parse_positive_ints("16,0", "M values")
    with pytest.raises(ValueError, match="integers"):
        shapes.parse_positive_ints("16,x", "M values")
    with pytest.raises(ValueError, match="unknown provider"):
        select_providers("fastlora,turbo")


def test_input_rotation_covers_twice_l2():
    l2 = 50 * 2**20
    assert timing.copies_needed(l2, l2) == 2
    assert timing.copies_needed(10 * l2, l2) == 1
    assert timing.copies_needed(1, l2) == timing.MAX_COPIES
    n = timing.copies_needed(3 * 2**20, l2)
    assert n * 3 * 2**20 >= 2 * l2 or n == timing.MAX_COPIES


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke pass is the no-GPU path")
def test_smoke_pass_every_provider(tmp_path, capsys):
    """Every provider runs forward + backward (kernels in the interpreter) within the
    fastlora.numerics bound, and each timing mode's callable runs; unsloth reports a skip."""
    opts = suite.Options(shapes=[], ms=(), ranks=(), modes=shapes.MODES,
                         providers=list(PROVIDERS), out=str(tmp_path))
    assert suite.run_smoke(opts) == 0
    text = capsys.readouterr().out
    table = (tmp_path / "smoke.md").read_text()
    for name in ("fastlora", "peft_bnb", "dequant_mm", "reference"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == len(shapes.SMOKE_SHAPES), table
        assert all(line.rstrip(" |").endswith("ok") for line in rows), table
    assert "skipped: unsloth" in table
    assert "matched the float64 reference" in text


@pytest.mark.parametrize("problems,code", [([], 0), (["dx spills: stack 8 B"], 1)],
                         ids=["clean", "spill"])
def test_compile_report_problems_fail_the_run(tmp_path, monkeypatch, problems, code):
    """A compile report with a problem (a spill, a missing tensor-core instruction, 32-bit
    addressing) makes `fastlora bench` exit non-zero, though every provider passed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(suite, "run_smoke", lambda opts: 0)
    monkeypatch.setattr(suite, "run_modelled", lambda opts: None)
    monkeypatch.setattr(suite, "write_compile_report", lambda out, say: problems)
    opts = suite.Options(shapes=[], ms=(), ranks=(), modes=shapes.MODES, providers=[],
                         out=str(tmp_path), say=lambda line: None)
    assert suite.run(opts) == code


def test_gpu_report_path_with_faked_timings(tmp_path, monkeypatch):
    """The GPU path after the timing (rows, speedups, achieved throughput, writers), with
    do_bench replaced by fixed times: fastlora 1 ms, peft_bnb 2 ms; one provider skipped and
    one failing."""
    def fake_measure(built, mode, xs, dys, warmup_ms, rep_ms):
        if built == "broken":
            raise RuntimeError("kernel exploded")
        return timing.Timing(built, built * 0.9, built * 1.1, 12.5)

    monkeypatch.setattr(suite, "measure", fake_measure)
    shape = shapes.SHAPES["llama3-8b.o_proj"]
    opts = suite.Options(shapes=[shape], ms=(2048,), ranks=(16,), modes=("forward",),
                         providers=["fastlora", "peft_bnb", "dequant_mm", "unsloth"],
                         out=str(tmp_path))
    env = {"gpu": "NVIDIA H100 80GB HBM3", "timestamp": "2026-01-01T00:00:00+00:00",
           "torch": "x", "cuda": "x", "triton": "x", "bitsandbytes": "x", "peft": "x",
           "fastlora": "x"}
    built = {"fastlora": 1.0, "peft_bnb": 2.0, "dequant_mm": "broken"}
    rows = [suite.measure_row(opts, env, shape, 16, 2048, "forward", name, built,
                              {"unsloth": "not installed"}, [], [])
            for name in opts.providers]
    peak = peaks.peak_for(env["gpu"])
    suite.derive(rows, opts, peak)
    fused, peft, broken, skipped = rows
    assert fused["speedup_vs_peft_bnb"] == 2.0 and peft["speedup_vs_peft_bnb"] == 1.0
    # 2 * 2048 * (4096*4096 + 4096*16 + 4096*16) FLOPs in 1 ms
    flops = 2 * 2048 * (4096 * 4096 + 2 * 4096 * 16)
    assert fused["tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert fused["pct_peak_tflops"] == pytest.approx(100 * fused["tflops"] / 989.4)
    assert broken["status"] == "error: RuntimeError: kernel exploded"
    assert skipped["status"] == "skipped: not installed"
    suite.write_gpu_results(opts, rows)
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 4
    assert "| llama3-8b.o_proj | 2048 | 16 | forward | fastlora | 1 |" in \
        (tmp_path / "results.md").read_text()
    assert (tmp_path / "speedup_forward_r16.png").stat().st_size > 0
