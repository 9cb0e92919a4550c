"""The benchmark suite's pieces: the modelled cost formulas on a hand-checked case, the shape
and option parsers, the peak table, and the no-GPU smoke pass of every provider."""

import dataclasses

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


@pytest.mark.quick
def test_weight_bytes_hand_checked():
    assert model.weight_bytes(D) == W4 == 268
    # without double quantisation: 256 packed + 8 fp32 absmax (32 bytes) = 288
    no_dq = model.Dims(4, 8, 64, 2, 2, False, 64, False)
    assert model.weight_bytes(no_dq) == 256 + 8 * 4 == 288


@pytest.mark.quick
def test_layer_flops_hand_checked():
    # forward: x W^T 2*4*8*64 = 4096, x A^T 2*4*2*64 = 1024, U B^T 2*4*8*2 = 128
    assert model.layer_flops("forward", D) == 4096 + 1024 + 128 == 5248
    # backward: dy W 2*4*64*8 = 4096; dy B and dy^T U 2*4*2*8 = 128 each;
    # dU^T x and dU A 2*4*2*64 = 1024 each
    assert model.layer_flops("backward", D) == 4096 + 2 * 128 + 2 * 1024 == 6400
    assert model.layer_flops("full", D) == 5248 + 6400


@pytest.mark.quick
def test_layer_bytes_hand_checked():
    # forward reads W, x, A, B and writes y: 268 + 512 + 256 + 32 + 64
    assert model.layer_bytes("forward", D) == W4 + X + A + B + Y == 1132
    # backward reads dy, x, W, A, B and writes dx, dA, dB
    assert model.layer_bytes("backward", D) == Y + X + W4 + A + B + X + A + B == 1932


# The tiled-path layer: the same but M = 32 (> 16, so the forward takes the tiled GEMM)
DT = model.Dims(m=32, n=8, k=64, r=2, e=2, bias=False, blocksize=64, double_quant=True)
XT = 32 * 64 * 2        # 4096
YT = 32 * 8 * 2         # 512
UT = 32 * 2 * 2         # 128
# one fp32 split-K partial [M, N] of D: 4 * 4 * 8
PART = 4 * 4 * 8        # 128


@pytest.mark.quick
def test_provider_steps_hand_checked():
    fused = model.steps("fastlora", "forward", D)
    # M = 4 <= 16: U = x A^T (reads x and A, writes U); the small-M kernel reads x and W,
    # writes one fp32 partial and (its tile's last program) reads it back with U and B and
    # writes y: x deq(W)^T 2*4*8*64 FLOPs plus U B^T 2*4*8*2
    assert [s.bytes for s in fused] == [X + A + U, X + W4 + 2 * PART + U + B + Y] \
        == [784, 1148]
    assert [s.flops for s in fused] == [1024, 4096 + 128]
    assert [s.kernel for s in fused] == [model.U_KERNEL, model.SMALL_M_KERNEL]
    tiled = model.steps("fastlora", "forward", DT)
    # M = 32: U, then the fused pass reads x, W, U, B and writes y
    assert [s.bytes for s in tiled] == [XT + A + UT, XT + W4 + UT + B + YT] == [4480, 5036]
    assert [s.flops for s in tiled] == [2 * 32 * 2 * 64, 2 * 32 * 8 * 64 + 2 * 32 * 8 * 2] \
        == [8192, 33792]
    assert [s.kernel for s in tiled] == [model.U_KERNEL, model.FWD_KERNEL]
    # M = 1 and 2: one launch on the CUDA cores (csrc_triton/gemv.py): reads x, W and A,
    # writes and reads back one fp32 partial [M, N] of y and [M, r] of U, reads B, writes y
    # and U; x deq(W)^T 2*M*8*64, x A^T 2*M*2*64, U B^T 2*M*8*2 FLOPs
    for m, kernel in ((1, model.GEMV_M1_KERNEL), (2, model.GEMV_M2_KERNEL)):
        (one,) = model.steps("fastlora", "forward", dataclasses.replace(D, m=m))
        x, y, u, part = m * 64 * 2, m * 8 * 2, m * 2 * 2, 4 * m * (8 + 2)
        assert one.bytes == x + W4 + A + 2 * part + B + y + u == \
            {1: 784, 2: 1012}[m]
        assert one.flops == m * (1024 + 256 + 32) and one.kernel == kernel
    fused_bwd = model.steps("fastlora", "backward", D)
    # dU/dB: reads dy, B, U, writes dU, dB, plus one fp32 part of dU [4, 2] and of dB [8, 2]
    # written and read back (8 B a value); dA: reads dU, x, A, writes dA, plus one fp32 part
    # of dA [2, 64] written and read; K = 64 on the blocksize, so the dx GEMM makes the LoRA
    # term: reads dU, A, dy, W and writes dx once
    assert [s.bytes for s in fused_bwd] == [Y + B + U + U + B + 8 * (4 + 8) * 2,
                                            U + X + A + A + 8 * 2 * 64,
                                            U + A + Y + W4 + X] == [352, 2064, 1116]
    assert [s.flops for s in fused_bwd] == [2 * (2 * 4 * 2 * 8), 2 * 2 * 64 * 4,
                                            2 * 4 * 64 * 2 + 2 * 4 * 64 * 8] \
        == [256, 1024, 5120]
    assert [s.kernel for s in fused_bwd] == [model.DU_DB_KERNEL, model.DA_KERNEL,
                                             model.DX_KERNEL]
    # K = 96 off the blocksize: the dA kernel writes dx's LoRA term (dx = dU A, 2*4*96*2
    # FLOPs more) and the dx GEMM reads it back: x96 = 4*96*2 bytes once more each
    k96 = dataclasses.replace(D, k=96)
    x96, a96, w96 = 4 * 96 * 2, 2 * 96 * 2, 8 * 96 // 2 + 12 + 4
    unaligned = model.steps("fastlora", "backward", k96)
    assert [s.bytes for s in unaligned[1:]] == [U + x96 + a96 + a96 + x96 + 8 * 2 * 96,
                                                Y + w96 + x96 + x96] == [3856, 2000]
    assert [s.flops for s in unaligned[1:]] == [2 * (2 * 2 * 96 * 4), 2 * 4 * 96 * 8] \
        == [3072, 6144]
    peft = model.steps("peft_bnb", "forward", D)
    # dequantize (W4 in, W16 out), matmul, PEFT's clone, lora_A, lora_B, * scaling, add
    assert [s.bytes for s in peft] == [W4 + W16, W16 + X + Y, 2 * Y, X + A + U, U + B + Y,
                                       2 * Y, 3 * Y] == [1292, 1600, 128, 784, 112, 128, 192]
    assert all(s.kernel is None for s in peft)
    buffered = model.steps("dequant_mm", "forward", D)
    # dequantize into the buffer, x W^T, U = x A^T, y += s U B^T (reads and writes y)
    assert sum(s.bytes for s in buffered) == (W4 + W16) + (W16 + X + Y) + (X + A + U) \
        + (U + B + 2 * Y) == 3852


def test_fastlora_dequant_steps_hand_checked():
    """fastlora's dequantize + cuBLAS path: its own U / du_db / da kernels (their sums finished in-kernel), its
    dequantize kernel (W4 in, W16 out into the shared buffer), cuBLAS for the base product."""
    fwd = model.steps("fastlora_dequant", "forward", D)
    # U = x A^T; dequantize; y = x W^T (+ bias); y += s U B^T (reads and writes y)
    assert [s.bytes for s in fwd] == [X + A + U, W4 + W16, W16 + X + Y, U + B + 2 * Y] \
        == [784, 1292, 1600, 176]
    assert [s.kernel for s in fwd] == [model.U_KERNEL, model.DEQUANT_KERNEL, None, None]
    bwd = model.steps("fastlora_dequant", "backward", D)
    fused_bwd = model.steps("fastlora", "backward", D)
    # dU/dB is the fused path's; the dA kernel writes dx's LoRA term too (reads dU, x, A,
    # writes dA and dx); then dequantize again and dx += dy W (reads dy, W16 and dx's LoRA
    # term, writes dx)
    assert bwd[0] == fused_bwd[0]
    assert (bwd[1].bytes, bwd[1].kernel) == (U + X + A + A + X + 8 * 2 * 64, model.DA_KERNEL) \
        == (2576, model.DA_KERNEL)
    assert [s.bytes for s in bwd[-2:]] == [W4 + W16, Y + W16 + X + X] == [1292, 2112]
    assert [s.kernel for s in bwd[-2:]] == [model.DEQUANT_KERNEL, None]


def test_expected_pick_hand_checked():
    """Where the model expects each path to win. At M = 1 the fused path reads 4-bit W once
    where the other writes and reads W16; at M = 8192 on H100 with a forward GEMM ceiling of
    0.5 cuBLAS at 0.80 wins despite the dequantize pass, and at ceiling 1.0 the fused one."""
    h100 = peaks.peak_named("H100 SXM")
    one, big = model.Dims(1, 4096, 4096, 16), model.Dims(8192, 4096, 4096, 16)
    assert model.expected_pick("full", one, h100) == {"forward": "fused", "dx": "fused"}
    low = {model.FWD_KERNEL: 0.5, model.DX_KERNEL: 0.95}
    assert model.expected_pick("full", big, h100, low) == {"forward": "dequant", "dx": "fused"}
    assert model.expected_pick("forward", big, h100, {model.FWD_KERNEL: 1.0}) == \
        {"forward": "fused"}
    assert model.expected_pick("backward", big, h100, {model.DX_KERNEL: 0.5}) == \
        {"dx": "dequant"}
    # break-even of the forward, by hand: the fused GEMM takes 2MNK / (P c) = 278 us / c; the
    # other path cuBLAS 278 / 0.80 = 347 us, the dequantize pass 42 MB / (0.9 BW) = 14 us, the
    # LoRA addmm's pass over y (2 x 67 MB read + written) 44 us, 3 launches 12 us: ~417 us,
    # so the fused forward wins above c = 278 / 413 = 0.67
    for c, want in ((0.6, "dequant"), (0.75, "fused")):
        assert model.expected_pick("forward", big, h100, {model.FWD_KERNEL: c,
                                                          model.DEQUANT_KERNEL: 0.9}) == \
            {"forward": want}


@pytest.mark.quick
def test_one_pass_pays_hand_checked():
    """The one-pass forward (issue 30 part 4) against U + the tiled GEMM on the hand-checked
    layer DT (M = 32) at 1 FLOP / 1 byte per us: the two-launch path takes 8964 + 135172 us at
    U / GEMM ceilings 0.5 / 0.25 (test_fastlora_time_at_injected_ceilings_hand_checked). The
    one-pass step counts the GEMM's FLOPs (33792; U's product is priced in its ceiling) and
    reads x once: x 4096 + W 268 + A 256 + U 128 + B 32 + y 512 = 5292 bytes. At c it takes
    max(33792 / c, 5292) + 4 us, so it pays above c = 33792 / 144132 = 0.2345."""
    (step,) = model.one_pass_steps(DT)
    assert (step.flops, step.bytes, step.kernel) == (33792, 5292, model.one_pass_kernel(2))
    two = {model.U_KERNEL: 0.5, model.FWD_KERNEL: 0.25}
    one_pass = model.one_pass_kernel(DT.r)
    assert model.step_seconds(step, SLOW, {one_pass: 0.24}) == pytest.approx(140804e-6)
    assert model.one_pass_pays(DT, SLOW, {**two, one_pass: 0.24})
    assert not model.one_pass_pays(DT, SLOW, {**two, one_pass: 0.23})
    # the ceiling is read per padded rank, as compiled
    assert [model.one_pass_kernel(r) for r in (2, 16, 17, 64)] == [
        f"{model.ONE_PASS_KERNEL}[r={p}]" for p in (16, 16, 32, 64)]
    assert model.model_kernel(model.ONE_PASS_KERNEL, "BLOCK_R=32,BLOCK_M=128 w8 s3 bf16") == \
        model.one_pass_kernel(32)
    with pytest.raises(ValueError, match="ranks up to 64"):
        model.one_pass_kernel(65)
    with pytest.raises(ValueError, match="no ceiling"):
        model.one_pass_pays(DT, SLOW, two)
    with pytest.raises(ValueError, match="M > 16"):
        model.one_pass_pays(D, SLOW, {**two, one_pass: 0.3})


@pytest.mark.parametrize("gpu,arch", [("H100 SXM", "sm_90"), ("A100 SXM 80GB", "sm_80")])
def test_one_pass_pays_only_for_narrow_layers_by_the_record(gpu, arch):
    """From the committed compile record: the one-pass forward's loop (x read a second time
    from shared memory for U's product, the 256-row tiles out of reach) costs more than the U
    kernel's pass over x on Llama-3-8B's layers at training M, and less on a 128-wide layer
    (the U kernel's share of the layer goes as 1 / N), at r = 16 and 64."""
    ceilings = model.one_pass_ceilings(arch)
    assert {model.FWD_KERNEL, model.U_KERNEL, *model.ONE_PASS_KERNEL_BOUND} <= set(ceilings)
    assert all(ceilings[k] < ceilings[model.FWD_KERNEL] for k in model.ONE_PASS_KERNEL_BOUND)
    peak = peaks.peak_named(gpu)
    for n, k, pays in ((4096, 4096, False), (14336, 4096, False), (4096, 14336, False),
                       (1024, 4096, False), (128, 4096, True)):
        for r in (16, 64):
            assert model.one_pass_pays(model.Dims(4096, n, k, r), peak, ceilings) is pays, \
                (n, k, r)


@pytest.mark.parametrize("mode", shapes.MODES)
@pytest.mark.parametrize("provider", list(model.PROVIDER_STEPS))
def test_every_provider_counts_the_layer_flops(provider, mode):
    """The providers differ in traffic, not in the matmuls they do."""
    for d in (D, DT, model.Dims(37, 96, 160, 16, 2, True, 64, False)):
        assert sum(s.flops for s in model.steps(provider, mode, d)) == model.layer_flops(mode, d)


# H100 SXM's dense bf16 FLOP/s: 132 SMs x 4096 FLOP per clock x 1.83 GHz (the datasheet's 989.4 TF)
H100_FLOPS = 132 * 4096 * 1.83e9
# a GPU doing 1e6 FLOP/s and 1e6 B/s: a kernel's FLOPs and bytes read as microseconds
SLOW = Peak("unit", tflops=1e-6, gbs=1e-3)
LAUNCH_US = 4  # model.LAUNCH_OVERHEAD_S, in microseconds


@pytest.mark.quick
def test_roofline_hand_checked():
    """The ideal roofline (no ceilings, no launch cost), kept for comparison."""
    fused = model.roofline_seconds(model.steps("fastlora", "forward", D), SLOW)
    # U max(1024, 784) + small-M max(4224, 1148) = 5248 us
    assert fused == pytest.approx((1024 + 4224) * 1e-6)
    peft = model.roofline_seconds(model.steps("peft_bnb", "forward", D), SLOW)
    # dequant 1292 + matmul max(4096, 1600) + clone 128 + lora_A max(1024, 784)
    # + lora_B max(128, 112) + scale 128 + add 192 = 6988 us
    assert peft == pytest.approx(6988e-6)


def test_model_constants_are_the_documented_assumptions():
    assert model.LAUNCH_OVERHEAD_S == LAUNCH_US * 1e-6
    assert model.PEER_GEMM_EFFICIENCY == 0.80
    assert model.PEER_BANDWIDTH_EFFICIENCY == 0.90
    assert set(model.KERNEL_BOUND.values()) == {"mma", "hbm"}
    assert {k for k, v in model.KERNEL_BOUND.items() if v == "mma"} == {model.FWD_KERNEL,
                                                                         model.DX_KERNEL}
    assert model.GPU_ARCHS["H100 SXM"] == "sm_90" and model.GPU_ARCHS["A100 SXM 80GB"] == "sm_80"
    assert all(gpu in model.GPU_ARCHS for gpu in peaks.MODELLED_GPUS)


@pytest.mark.quick
def test_fastlora_time_at_injected_ceilings_hand_checked():
    """max(FLOPs / (P c), bytes / BW) + launch for the GEMM kernel, max(FLOPs / P,
    bytes / (BW c)) + launch for the memory-bound one."""
    ceilings = {model.U_KERNEL: 0.5, model.FWD_KERNEL: 0.25}
    u, fwd = model.steps("fastlora", "forward", DT)
    # U (memory-bound): max(8192, 4480 / 0.5 = 8960) + 4 = 8964 us (the ceiling is on bytes)
    assert model.step_seconds(u, SLOW, ceilings) == pytest.approx(8964e-6)
    # fused GEMM: max(33792 / 0.25 = 135168, 5036) + 4 = 135172 us (the ceiling is on FLOPs)
    assert model.step_seconds(fwd, SLOW, ceilings) == pytest.approx(135172e-6)
    assert model.modelled_seconds([u, fwd], SLOW, ceilings) == pytest.approx(144136e-6)
    # small-M path of D at c = 0.5 for the small-M kernel, the others absent (unmodelled: 1.0):
    # U max(1024, 784) + 4 = 1028; small-M max(4224, 1148 / 0.5 = 2296) + 4 = 4228
    small = model.steps("fastlora", "forward", D)
    assert model.modelled_seconds(small, SLOW, {model.SMALL_M_KERNEL: 0.5}) == \
        pytest.approx((1028 + 4228) * 1e-6)
    # at c = 0.1 the small-M kernel's bytes bind: 1148 / 0.1 = 11480 + 4
    assert model.step_seconds(small[1], SLOW, {model.SMALL_M_KERNEL: 0.1}) == \
        pytest.approx(11484e-6)
    # no ceilings at all: the roofline plus one launch per kernel (two)
    assert model.modelled_seconds(small, SLOW) == pytest.approx(
        model.roofline_seconds(small, SLOW) + 2 * LAUNCH_US * 1e-6)
    with pytest.raises(ValueError, match="ceiling"):
        model.step_seconds(u, SLOW, {model.U_KERNEL: 0.0})


def test_peer_time_at_assumed_efficiencies_hand_checked():
    """Peers: max(FLOPs / (0.80 P), bytes / (0.90 BW)) + launch, whatever ceilings say."""
    peft = model.steps("peft_bnb", "forward", D)
    # dequant 1292 / 0.9; matmul max(4096 / 0.8 = 5120, 1600 / 0.9); clone 128 / 0.9;
    # lora_A max(1024 / 0.8 = 1280, 784 / 0.9); lora_B max(128 / 0.8 = 160, 112 / 0.9);
    # scale 128 / 0.9; add 192 / 0.9; + 7 launches of 4 us
    expected = (1292 + 128 + 128 + 192) / 0.9 + 5120 + 1280 + 160 + 7 * LAUNCH_US
    assert expected == pytest.approx(8521.333, abs=1e-3)
    assert model.modelled_seconds(peft, SLOW, {model.FWD_KERNEL: 0.01}) == \
        pytest.approx(expected * 1e-6)


@pytest.mark.parametrize("kernel", model.fastlora_kernels())
def test_lower_ceiling_gives_longer_modelled_time(kernel):
    """Halving one kernel's ceiling never shortens fastlora's modelled time, and lengthens it
    wherever that kernel's capped term binds (every kernel on a real layer at the M that runs
    it: 8192 for the tiled path and the backward, 1 and 2 for the CUDA-core path, 4 for the
    small-M path)."""
    h100 = peaks.peak_named("H100 SXM")
    base = {k: 0.8 for k in model.fastlora_kernels()}
    lower = {**base, kernel: 0.4}
    # the M each runs at: the one-launch kernel at 1 and 2 rows, the small-M one at 4
    binds = {model.GEMV_M1_KERNEL: 1, model.GEMV_M2_KERNEL: 2, model.SMALL_M_KERNEL: 4}
    # the dequantize kernel runs on the dequantize + cuBLAS path only
    provider = "fastlora_dequant" if kernel == model.DEQUANT_KERNEL else "fastlora"
    for m in (1, 2, 4, 8192):
        d = model.Dims(m, 4096, 4096, 16)
        st = model.steps(provider, "full", d)
        before = model.modelled_seconds(st, h100, base)
        after = model.modelled_seconds(st, h100, lower)
        assert after >= before
        if m == binds.get(kernel, 8192):
            assert after > before, (kernel, m)


class _Spec:
    """The CompileSpec fields the ceiling selection reads."""

    def __init__(self, kernel, config, archs=("sm_80", "sm_90"), dtype="*bf16", target=0.0,
                 fma_dot=False):
        self.kernel, self.config, self.archs = kernel, config, archs
        self.signature = {"x_ptr": dtype, "packed_ptr": "*u8"}
        self.ceiling_target, self.fma_dot = target, fma_dot


FAKE_SPECS = [
    _Spec(model.FWD_KERNEL, "big", target=0.85),
    _Spec(model.FWD_KERNEL, "headline2", target=0.85),
    _Spec(model.FWD_KERNEL, "small"),
    _Spec(model.FWD_KERNEL, "fp32", dtype="*fp32"),
    _Spec(model.FWD_KERNEL, "ieee", dtype="*fp32", fma_dot=True),
    _Spec(model.U_KERNEL, "u1"), _Spec(model.U_KERNEL, "u2"),
    _Spec(model.DX_KERNEL, "dx80", archs=("sm_80",), target=0.85),
]


def _row(kernel, config, arch, ceiling):
    return {"kernel": kernel, "config": config, "arch": arch, "ceiling": ceiling,
            "bound": None if ceiling is None else "mma"}


def test_needed_specs_prefer_headline_configs():
    picked = model.needed_specs("sm_90", "16bit", FAKE_SPECS)
    # the forward's two headline specs (not "small"), both U specs, no dx (sm_80 only)
    assert [(s.kernel, s.config) for s in picked] == sorted(
        [(model.FWD_KERNEL, "big"), (model.FWD_KERNEL, "headline2"),
         (model.U_KERNEL, "u1"), (model.U_KERNEL, "u2")])
    assert [s.config for s in model.needed_specs("sm_90", "fp32", FAKE_SPECS)] == ["fp32"]
    assert [s.config for s in model.needed_specs("sm_80", "16bit", FAKE_SPECS,
                                                 [model.DX_KERNEL])] == ["dx80"]


@pytest.mark.quick
def test_ceilings_from_rows_hand_checked():
    rows = [_row(model.FWD_KERNEL, "big", "sm_90", 0.60),
            _row(model.FWD_KERNEL, "headline2", "sm_90", 0.70),
            _row(model.FWD_KERNEL, "small", "sm_90", 0.95),   # higher, but not a headline
            _row(model.FWD_KERNEL, "big", "sm_80", 0.50),
            _row(model.FWD_KERNEL, "fp32", "sm_90", 0.40),
            _row(model.FWD_KERNEL, "ieee", "sm_90", None),
            _row(model.U_KERNEL, "u1", "sm_90", 0.30),
            _row(model.U_KERNEL, "u2", "sm_90", 0.45),
            _row(model.U_KERNEL, "u2", "sm_90", None),
            # a row no spec knows: its dtype comes from the config text
            _row(model.DA_KERNEL, "BLOCK_M=64 w4 s3 bf16 R_PAD=64", "sm_90", 0.2)]
    assert model.ceilings_from_rows(rows, "sm_90", "16bit", FAKE_SPECS) == {
        model.FWD_KERNEL: 0.70, model.U_KERNEL: 0.45, model.DA_KERNEL: 0.2}
    assert model.ceilings_from_rows(rows, "sm_80", "16bit", FAKE_SPECS) == {
        model.FWD_KERNEL: 0.50}
    assert model.ceilings_from_rows(rows, "sm_90", "fp32", FAKE_SPECS) == {
        model.FWD_KERNEL: 0.40}
    # kernel_ceilings reads given rows without compiling (against the shipped specs, which
    # know none of these configs: the config text gives the dtype)
    made_up = [_row(model.FWD_KERNEL, "BLOCK_M=64 w4 s3 bf16 made-up", "sm_80", 0.5),
               _row(model.FWD_KERNEL, "BLOCK_M=64 w4 s3 fp32 made-up", "sm_80", 0.9)]
    assert model.kernel_ceilings("sm_80", "16bit", made_up) == {model.FWD_KERNEL: 0.5}
    text = model.describe_ceilings({model.FWD_KERNEL: 0.5, model.U_KERNEL: 0.25})
    assert "_nf4_lora_fwd_kernel 0.50 of tensor peak" in text
    assert "_lora_u_kernel 0.25 of HBM" in text
    assert "unmodelled" in text and model.DX_KERNEL in text


def test_modelled_rows_are_labelled_and_relative_to_peft(tmp_path):
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(1, 4096), ranks=(16,),
                         modes=("full",), providers=["fastlora", "peft_bnb"], out=str(tmp_path))
    rows = suite.modelled_rows(opts, ceilings={})  # every fastlora kernel unmodelled (1.0)
    assert len(rows) == len(peaks.MODELLED_GPUS) * 2 * 2
    for row in rows:
        assert all(k.startswith("modelled_") for k in row if k.endswith(("us", "mb", "gflop")))
        if row["provider"] == "peft_bnb":
            assert row["modelled_speedup_vs_peft_bnb"] == 1.0
            assert "assumed" in row["modelled_at"]
        else:  # one decode token: the fused path reads the 4-bit weight once, not W16 twice;
            # 4 us per launch (9 fastlora, 15 PEFT) caps that gain near 2.6x on H100
            assert row["modelled_speedup_vs_peft_bnb"] > (2.0 if row["m"] == 1 else 1.0)
            assert "unmodelled" in row["modelled_at"]
    # per-GPU ceilings: a low forward GEMM ceiling on H100 only slows H100's fastlora rows
    low = suite.modelled_rows(opts, ceilings={"H100 SXM": {model.FWD_KERNEL: 0.3}})
    for ideal, capped in zip(rows, low):
        if ideal["provider"] == "fastlora" and ideal["gpu"] == "H100 SXM" and ideal["m"] > 16:
            assert capped["modelled_us"] > ideal["modelled_us"]
            assert "nf4_lora_fwd_kernel=0.30" in capped["modelled_at"]
        else:
            assert capped["modelled_us"] == ideal["modelled_us"]


def test_modelled_table_names_its_ceilings(tmp_path):
    """run_modelled with the compile report's rows at hand: no compiling, and the table says
    what is modelled and at which ceilings."""
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(8192,), ranks=(16,),
                         modes=("forward",), providers=["fastlora", "peft_bnb"],
                         out=str(tmp_path), say=lambda line: None)
    rows = [_row(model.FWD_KERNEL, "BLOCK_M=128 w8 s3 bf16 made-up", "sm_90", 0.5),
            _row(model.U_KERNEL, "BLOCK_M=64 w4 s3 bf16 made-up", "sm_90", 0.25)]
    suite.run_modelled(opts, rows)
    text = (tmp_path / "modelled.md").read_text()
    assert "MODELLED, not measured" in text
    assert "H100 SXM (sm_90, 16bit): _nf4_lora_fwd_kernel 0.50 of tensor peak" in text
    assert "_lora_u_kernel 0.25 of HBM" in text
    assert "0.80 of tensor-core peak" in text and "0.90 of bandwidth" in text
    assert "A100 SXM 80GB (sm_80, 16bit): none compiled; unmodelled" in text
    # the H100 time is the hand formula at these ceilings
    d = opts.dims(8192, shapes.SHAPES["llama3-8b.q_proj"], 16)
    h100 = peaks.peak_named("H100 SXM")
    u, fwd = model.steps("fastlora", "forward", d)
    want = max(u.flops / H100_FLOPS, u.bytes / (3350e9 * 0.25)) \
        + max(fwd.flops / (H100_FLOPS * 0.5), fwd.bytes / 3350e9) + 2 * 4e-6
    assert model.modelled_seconds([u, fwd], h100, {model.FWD_KERNEL: 0.5,
                                                   model.U_KERNEL: 0.25}) == pytest.approx(want)
    import csv

    with open(tmp_path / "modelled.csv", newline="") as fh:
        written = {(r["gpu"], r["provider"]): r for r in csv.DictReader(fh)}
    fused = written[("H100 SXM", "fastlora")]
    assert float(fused["modelled_us"]) == pytest.approx(want * 1e6)
    assert fused["modelled_at"] == \
        "hot-loop ceilings: lora_u_kernel=0.25 nf4_lora_fwd_kernel=0.50"
    assert written[("A100 SXM 80GB", "fastlora")]["modelled_at"] == \
        "hot-loop ceilings: lora_u_kernel=unmodelled nf4_lora_fwd_kernel=unmodelled"


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the smoke pass is what "
                    "fastlora bench runs without a GPU (a GPU times the providers instead)")
def test_smoke_pass_every_provider(tmp_path, capsys):
    """Every provider runs forward + backward (kernels in the interpreter) within the
    fastlora.numerics bound, and each timing mode's callable runs; unsloth reports a skip."""
    opts = suite.Options(shapes=[], ms=(), ranks=(), modes=shapes.MODES,
                         providers=list(PROVIDERS), out=str(tmp_path))
    assert suite.run_smoke(opts) == 0
    text = capsys.readouterr().out
    table = (tmp_path / "smoke.md").read_text()
    for name in ("fastlora", "fastlora_fused", "fastlora_dequant", "peft_bnb", "dequant_mm",
                 "reference"):
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
    monkeypatch.setattr(suite, "compile_rows", lambda: [])
    monkeypatch.setattr(suite, "run_modelled", lambda opts, rows=None: None)
    monkeypatch.setattr(suite, "write_compile_report", lambda out, say, rows=None: problems)
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
    assert fused["pct_peak_tflops"] == pytest.approx(100 * fused["tflops"] * 1e12 / H100_FLOPS)
    assert broken["status"] == "error: RuntimeError: kernel exploded"
    assert skipped["status"] == "skipped: not installed"
    suite.write_gpu_results(opts, rows)
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 4
    assert "| llama3-8b.o_proj | 2048 | 16 | forward | fastlora | 1 |" in \
        (tmp_path / "results.md").read_text()
    assert (tmp_path / "speedup_forward_r16.png").stat().st_size > 0


def test_modelled_table_shows_the_expected_pick(tmp_path):
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(1, 8192), ranks=(16,),
                         modes=("forward",), providers=["fastlora", "fastlora_dequant",
                                                        "peft_bnb"], out=str(tmp_path))
    ceilings = {model.FWD_KERNEL: 0.5}
    rows = suite.modelled_rows(opts, ceilings=ceilings)
    h100 = [r for r in rows if r["gpu"] == "H100 SXM"]
    assert {r["provider"] for r in h100} == {"fastlora", "fastlora_dequant", "peft_bnb"}
    picks = {r["m"]: r["modelled_pick"] for r in h100}
    assert picks == {1: "forward=fused", 8192: "forward=dequant"}
    dequant = next(r for r in h100 if r["provider"] == "fastlora_dequant" and r["m"] == 8192)
    fused = next(r for r in h100 if r["provider"] == "fastlora" and r["m"] == 8192)
    assert dequant["modelled_us"] < fused["modelled_us"]
    assert "dequant_4bit_kernel=unmodelled" in dequant["modelled_at"]
    assert "cuBLAS: roofline at 0.80" in dequant["modelled_at"]
    opts.say = lambda line: None
    suite.run_modelled(opts, [_row(model.FWD_KERNEL, "BLOCK_M=128 w8 s3 bf16 made-up",
                                   "sm_90", 0.5)])
    text = (tmp_path / "modelled.md").read_text()
    assert "expected base path" in text and "forward=dequant" in text


def test_gpu_rows_report_each_path_and_the_pick(tmp_path, monkeypatch):
    """On a GPU (faked): fastlora_fused / fastlora_dequant run with their path forced, forward
    and backward alike; the dispatched fastlora row names the dispatcher's kept pick."""
    from fastlora.bench.providers import Built
    from fastlora.launch import dispatch

    seen = {}

    def fake_measure(built, mode, xs, dys, warmup_ms, rep_ms):
        seen[built.base_path] = dispatch.requested()
        return timing.Timing(1.0, 0.9, 1.1, 0.0)

    monkeypatch.setattr(suite, "measure", fake_measure)
    monkeypatch.setitem(dispatch._NAMES, "cuda", "Fake GPU")
    shape = shapes.SHAPES["llama3-8b.o_proj"]
    monkeypatch.setitem(dispatch._PICKS, dispatch.key("forward", torch.device("cuda"),
                                                      torch.bfloat16, 4096, 4096, 2048),
                        "dequant")
    opts = suite.Options(shapes=[shape], ms=(2048,), ranks=(16,), modes=("full",),
                         providers=["fastlora", "fastlora_fused", "fastlora_dequant"],
                         out=str(tmp_path))
    built = {"fastlora": Built(None, []), "fastlora_fused": Built(None, [], "fused"),
             "fastlora_dequant": Built(None, [], "dequant")}
    rows = {name: suite.measure_row(opts, {}, shape, 16, 2048, "full", name, built, {}, [], [])
            for name in opts.providers}
    assert seen == {None: "auto", "fused": "fused", "dequant": "dequant"}
    assert dispatch.requested() == "auto"  # restored after each
    assert rows["fastlora"]["base_path"] == "auto: forward=dequant dx=?"
    assert rows["fastlora_fused"]["base_path"] == "fused"
    assert rows["fastlora_dequant"]["base_path"] == "dequant"
    assert all(r["status"] == "ok" for r in rows.values())


def test_block_mode_smoke_pass_and_selection(tmp_path, capsys, monkeypatch):
    """`--modes block` (issue 13): the q/k/v and gate/up blocks of each selected model; without
    a GPU a smoke pass where per-layer fastlora, grouped fastlora and PEFT each match float64
    on a tiny block, forward and backward, and no timing is claimed. Only the block runs when
    it is the only mode (the per-layer suite is not entered)."""
    from fastlora.bench import block

    picked = block.blocks([shapes.SHAPES["llama3-8b.q_proj"], shapes.SHAPES["qwen2.5-7b.o_proj"]])
    assert [(m, b, [s.name.rpartition(".")[2] for s in members])
            for m, b, members in picked] == [
        ("llama3-8b", "qkv", ["q_proj", "k_proj", "v_proj"]),
        ("llama3-8b", "gate_up", ["gate_proj", "up_proj"]),
        ("qwen2.5-7b", "qkv", ["q_proj", "k_proj", "v_proj"]),
        ("qwen2.5-7b", "gate_up", ["gate_proj", "up_proj"])]
    monkeypatch.setattr(suite, "_run_layers", lambda opts: pytest.fail("per-layer suite ran"))
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(1,), ranks=(16,),
                         modes=("block",), providers=[], out=str(tmp_path),
                         compile_report=False)
    assert suite.check_output_csv(opts) == (str(tmp_path / "block.csv"), None)
    assert suite.run(opts) == 0
    table = (tmp_path / "block_smoke.md").read_text()
    for name in block.PROVIDERS:
        rows = [line for line in table.splitlines() if f"| {name} |" in line]
        assert len(rows) == 2 and all(line.rstrip(" |").endswith("ok") for line in rows), table
    assert "Block timings need a CUDA GPU" in table
    assert "every provider matched the float64 reference" in capsys.readouterr().out


def _fake_gpu(monkeypatch, times: list) -> None:
    """A GPU that is not there, for the bench's GPU paths: CUDA reported present (an H100,
    64 KB of L2) and do_bench replaced by `times` in turn (each callable still runs once, in
    the interpreter, and its gradients are cleared as do_bench would)."""
    import triton.testing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("Props", (), {"L2_cache_size": 2**16})())
    turn = iter(times)

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        fn()
        for t in grad_to_none:
            t.grad = None
        return next(turn)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)


def test_block_gpu_path_with_faked_timings(tmp_path, monkeypatch):
    """The block mode's GPU path on a tiny model, with do_bench replaced by fixed times
    (per-layer fastlora 3 ms, grouped 2 ms, PEFT 6 ms; each callable still runs once, in the
    interpreter): the rows, the two ratios, block.csv (appended on a second run) and block.md."""
    from fastlora.bench import block

    monkeypatch.setattr(shapes, "MODELS", {"tiny": shapes._model("tiny", 64, 128, 1, 32)})
    _fake_gpu(monkeypatch, [3.0, 2.0, 6.0] * 8)
    opts = suite.Options(shapes=shapes.MODELS["tiny"][:1], ms=(8,), ranks=(8,),
                         modes=("block",), providers=[], out=str(tmp_path),
                         compile_report=False, say=lambda line: None)
    assert block.run(opts) == 0
    table = (tmp_path / "block.md").read_text()
    assert "| tiny | qkv | 8 | 8 | block_full | fastlora_grouped | 2 | 1.5 | 3 | ok |" in table
    assert "| tiny | gate_up | 8 | 8 | block_forward | peft_bnb | 6 | 0.5 | 1 | ok |" in table
    _fake_gpu(monkeypatch, [3.0, 2.0, 6.0] * 8)
    assert block.run(opts) == 0
    assert (tmp_path / "block.csv").read_text().count("\n") == 1 + 2 * 12


def test_dora_mode_smoke_pass_and_modelled_table(tmp_path, capsys, monkeypatch):
    """`--modes dora` (issue 12) without a GPU: the plain LoRA layer, fastlora's DoRA and
    PEFT's DoRA each match their float64 reference on a tiny layer, and the modelled table
    compares them per shape, labelled modelled; the per-layer suite is not entered."""
    from fastlora.bench import dora

    monkeypatch.setattr(suite, "_run_layers", lambda opts: pytest.fail("per-layer suite ran"))
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(16, 4096),
                         ranks=(16,), modes=("dora",), providers=[], out=str(tmp_path),
                         compile_report=False)
    assert suite.check_output_csv(opts) == (str(tmp_path / "dora.csv"), None)
    assert suite.run(opts) == 0
    smoke = (tmp_path / "dora_smoke.md").read_text()
    for name in dora.PROVIDERS:
        rows = [line for line in smoke.splitlines() if f"| {name} |" in line]
        assert len(rows) == 1 and rows[0].rstrip(" |").endswith("ok"), smoke
    assert "DoRA timings need a CUDA GPU" in smoke
    modelled = (tmp_path / "dora_modelled.md").read_text()
    assert "MODELLED, not measured" in modelled
    rows = dora.modelled_rows(opts, ceilings={})
    assert len(rows) == 2 * 2 * 2  # GPUs x M x modes
    for row in rows:
        assert row["vs_plain"] == pytest.approx(row["fastlora_dora"] / row["fastlora"])
        # DoRA adds the norm pass, the combine and the magnitude's reduction: never free
        assert row["fastlora_dora"] > row["fastlora"]
    assert "every provider matched its float64 reference" in capsys.readouterr().out


def test_dora_gpu_path_with_faked_timings(tmp_path, monkeypatch):
    """The DoRA mode's GPU path on a tiny layer, do_bench replaced by fixed times (plain 2 ms,
    DoRA 2.2 ms, PEFT DoRA 5.5 ms; each callable still runs once, in the interpreter): the two
    ratios, dora.csv (appended on a second run) and dora.md."""
    from fastlora.bench import dora

    _fake_gpu(monkeypatch, [2.0, 2.2, 5.5] * 2)
    tiny = shapes.LayerShape("tiny.q_proj", 64, 128)
    opts = suite.Options(shapes=[tiny], ms=(8,), ranks=(8,), modes=("dora",), providers=[],
                         out=str(tmp_path), compile_report=False, say=lambda line: None)
    assert dora.run(opts) == 0
    table = (tmp_path / "dora.md").read_text()
    assert "| tiny.q_proj | 8 | 8 | dora_full | fastlora_dora | 2.2 | 1.1 | 2.5 | ok |" in table
    assert "| tiny.q_proj | 8 | 8 | dora_forward | peft_dora_bnb | 5.5 | 2.75 | 1 | ok |" in table
    _fake_gpu(monkeypatch, [2.0, 2.2, 5.5] * 2)
    assert dora.run(opts) == 0
    assert (tmp_path / "dora.csv").read_text().count("\n") == 1 + 2 * 6


def test_mixed_mode_smoke_pass_and_modelled_table(tmp_path, capsys, monkeypatch):
    """`--modes mixed` (issue 14) without a GPU: the fused mixed batch (every adapter's
    gradients) and PEFT's mixed batch match the float64 reference on a tiny layer, every
    provider runs each mode, and the modelled table compares them per adapter count, labelled
    modelled; the per-layer suite is not entered."""
    from fastlora.bench import mixed

    monkeypatch.setattr(suite, "_run_layers", lambda opts: pytest.fail("per-layer suite ran"))
    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(16, 4096),
                         ranks=(16,), modes=("mixed",), providers=[], out=str(tmp_path),
                         compile_report=False)
    assert suite.check_output_csv(opts) == (str(tmp_path / "mixed.csv"), None)
    assert suite.run(opts) == 0
    smoke = (tmp_path / "mixed_smoke.md").read_text()
    for name in mixed.PROVIDERS:
        rows = [line for line in smoke.splitlines() if f"| {name} |" in line]
        assert len(rows) == 1 and rows[0].rstrip(" |").endswith("ok"), smoke
    assert "Timings need a CUDA GPU" in smoke
    assert "MODELLED, not measured" in (tmp_path / "mixed_modelled.md").read_text()
    rows = mixed.modelled_rows(opts, {}, lambda gpu, rank: {})
    assert len(rows) == 2 * 2 * 3 * 2  # GPUs x M x adapter counts x modes
    for row in rows:
        assert row["vs_single"] == pytest.approx(row["fastlora_mixed"] / row["fastlora"])
        if row["adapters"] == 1:  # one adapter: the same launches as the single layer
            assert row["fastlora_mixed"] == pytest.approx(row["fastlora"])
        else:  # more columns in the small products, and PEFT loops over the adapters
            assert row["fastlora"] < row["fastlora_mixed"] < row["peft_mixed_bnb"]
    assert "matched the float64 reference" in capsys.readouterr().out


@pytest.mark.full("the mixed GPU path's timings are faked; the plain one is in the default tier")
def test_mixed_gpu_path_with_faked_timings(tmp_path, monkeypatch):
    """The mixed mode's GPU path on a tiny layer, do_bench replaced by fixed times (one
    adapter 2 ms, mixed 2.2 ms, PEFT 6 ms, one at a time 5 ms; each callable still runs once,
    in the interpreter): the ratio, mixed.csv (appended on a second run) and mixed.md."""
    from fastlora.bench import mixed

    _fake_gpu(monkeypatch, [2.0, 2.2, 6.0, 5.0] * 6)
    tiny = shapes.LayerShape("tiny.q_proj", 64, 128)
    opts = suite.Options(shapes=[tiny], ms=(8,), ranks=(8,), modes=("mixed",), providers=[],
                         out=str(tmp_path), compile_report=False, say=lambda line: None)
    assert mixed.run(opts) == 0
    table = (tmp_path / "mixed.md").read_text()
    assert "| tiny.q_proj | 8 | 8 | 16 | mixed_full | fastlora_mixed | 2.2 | 1.1 | ok |" in table
    assert "| tiny.q_proj | 8 | 8 | 4 | mixed_forward | peft_mixed_bnb | 6 | 3 | ok |" in table
    _fake_gpu(monkeypatch, [2.0, 2.2, 6.0, 5.0] * 6)
    assert mixed.run(opts) == 0
    assert (tmp_path / "mixed.csv").read_text().count("\n") == 1 + 2 * 24


@pytest.mark.parametrize("kind", ["lora", "dora", "mixed"])
def test_host_time_mode_measures_both_layers(monkeypatch, kind):
    """`fastlora bench --modes host` (fastlora/bench/hosttime.py): the patched layer's call
    reaches exactly its one launch at M = 1 (U and y: csrc_triton/gemv.py), recorded not run
    (a DoRA layer's too: its norm made once, when the call was prepared; a mixed batch of
    four one-token samples over three adapters: the segmented U and the small-M GEMM, its
    adapters joined once); PEFT's call reaches bitsandbytes' product (recorded); both give a
    positive time."""
    from fastlora.bench import hosttime

    monkeypatch.setattr(hosttime, "ROUNDS", 3)
    got = hosttime.measure("cuda" if torch.cuda.is_available() else "cpu", 1,
                           dora=kind == "dora",
                           names=hosttime.MIXED_NAMES if kind == "mixed" else None)
    assert set(got) == set(hosttime.PROVIDERS)
    assert got["fastlora"][1] == (2.0 if kind == "mixed" else 1.0), got
    assert all(us > 0 for us, _ in got.values()), got


def test_host_time_of_a_decode_step(monkeypatch):
    """The host mode's decode-step row: the demo's 4-bit Llama, one token, patched with groups
    (7 launches a decoder layer, one a LoRA layer; issue 29's limit is 8) and unpatched
    (bitsandbytes' product recorded); both give a positive time."""
    from fastlora.bench import hosttime

    monkeypatch.setattr(hosttime, "ROUNDS", 3)
    got = hosttime.measure_decode_step("cuda" if torch.cuda.is_available() else "cpu")
    assert set(got) == set(hosttime.PROVIDERS)
    assert got["fastlora"][1] == 7.0, got
    assert all(us > 0 for us, _ in got.values()), got
