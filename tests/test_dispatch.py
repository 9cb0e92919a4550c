"""The base product's two paths and the choice between them (issue 16): fastlora's dequantize
kernel into one shared buffer + cuBLAS, against the fused GEMMs (fastlora/launch/dispatch.py,
fastlora/launch/buffer.py). Correctness of the dequantize path over the float64 matrix is in
test_forward.py / test_backward.py (the `base_path` fixture); here: the settings, the buffer's
life, and the dispatcher's timing and cache (timer mocked: no GPU here)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fastlora
from fastlora import peft_patch
from fastlora.launch import backward as launch_backward
from fastlora.launch import buffer, dispatch
from fastlora.launch import forward as launch_forward
from fastlora.launch.dequant import dequantize_4bit_triton
from fastlora.numerics import assert_close
from fastlora.quant import dequantize_4bit_torch
from helpers import DEVICE, N, make_case, reference_pair, tag_dispatch_candidates

DTYPE = torch.bfloat16


@pytest.fixture(autouse=True)
def clean_dispatcher():
    """Every test starts with no picks, no buffer, no override and the default cap."""
    def reset():
        dispatch.clear_picks()
        dispatch.set_base_path(None)
        buffer.set_dequant_buffer_cap_mb(None)
        buffer.release_dequant_buffer()
    reset()
    yield
    reset()


@pytest.fixture
def ran(monkeypatch):
    """Which path each launcher call ran: a list of ('forward' | 'dx', 'fused' | 'dequant')."""
    calls = []

    def spy(role, name, real):
        def wrapper(*args, **kwargs):
            calls.append((role, name))
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(launch_forward, "_launch_tiled",
                        spy("forward", "fused", launch_forward._launch_tiled))
    monkeypatch.setattr(launch_forward, "_launch_small_m",
                        spy("forward", "fused", launch_forward._launch_small_m))
    monkeypatch.setattr(dispatch, "forward_dequant",
                        spy("forward", "dequant", dispatch.forward_dequant))
    monkeypatch.setattr(dispatch, "dx_dequant", spy("dx", "dequant", dispatch.dx_dequant))
    real_choose = dispatch.choose

    def choose(role, *args, **kwargs):  # the fused dx launch is a lambda: count it here
        pick = real_choose(role, *args, **kwargs)
        if role == "dx" and pick == "fused":
            calls.append(("dx", "fused"))
        return pick
    monkeypatch.setattr(dispatch, "choose", choose)
    return calls


def layer_case(m=20, n=N, k=128, seed=0, bias=True):
    return make_case(m, n, k, 8, DTYPE, "nf4", 64, True, bias, 0.0, seed=seed)


def forward(case, **kwargs):
    return launch_forward.lora_forward(*case.args(DTYPE), case.dropout_p, case.seed, **kwargs)


def dx_of(case, **kwargs):
    x, a, b = (t.to(DTYPE) for t in (case.x, case.lora_A, case.lora_B))
    dy = torch.randn(x.shape[0], b.shape[0], generator=torch.Generator().manual_seed(3))
    dx, _, _ = launch_backward.lora_backward(dy.to(DEVICE, DTYPE), x, x @ a.t(), case.packed,
                                             case.state, a, b, case.scaling, 0.0, 0, True,
                                             False, False, **kwargs)
    return dx


# ----------------------------------------------------------------------------- the settings

@pytest.mark.quick
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: on a GPU auto times both "
                    "paths (tests/test_gpu.py checks that)")
def test_default_on_cpu_is_fused(ran):
    case = layer_case()
    forward(case)
    dx_of(case)
    assert ran == [("forward", "fused"), ("dx", "fused")]
    assert buffer.allocated_bytes() == 0


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_env_var_forces_either_path(monkeypatch, ran, path):
    monkeypatch.setenv("FASTLORA_BASE_PATH", path)
    case = layer_case()
    truth, baseline = reference_pair(case, DTYPE)
    y, _ = forward(case)
    assert_close("y", y, truth["y"], baseline["y"])
    dx_of(case)
    assert ran == [("forward", path), ("dx", path)]
    assert (buffer.allocated_bytes() > 0) == (path == "dequant")


def test_argument_and_setter_override_the_env_var(monkeypatch, ran):
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    case = layer_case()
    forward(case, base="dequant")
    dx_of(case, base="dequant")
    with dispatch.forced("dequant"):
        forward(case)
    forward(case)  # restored: the environment's fused
    assert ran == [("forward", "dequant"), ("dx", "dequant"), ("forward", "dequant"),
                   ("forward", "fused")]


def test_explicit_fused_config_or_path_pins_the_fused_path(monkeypatch, ran):
    """The self-check and the benchmarks pass fused configs: those always run fused."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    case = layer_case(m=11)
    forward(case, path="small_m")
    dx_of(case, config={"dx": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1,
                               "num_warps": 4, "num_stages": 1}})
    assert ran == [("forward", "fused"), ("dx", "fused")]
    with pytest.raises(ValueError, match="base='dequant'"):
        forward(case, path="tiled", base="dequant")


@pytest.mark.quick
def test_bad_settings_name_themselves(monkeypatch):
    case = layer_case()
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fastest")
    with pytest.raises(ValueError, match="FASTLORA_BASE_PATH"):
        forward(case)
    monkeypatch.delenv("FASTLORA_BASE_PATH")
    with pytest.raises(ValueError, match="base"):
        forward(case, base="cublas")
    with pytest.raises(ValueError, match="base path"):
        dispatch.set_base_path("turbo")
    monkeypatch.setenv("FASTLORA_DEQUANT_BUFFER_MB", "lots")
    with pytest.raises(ValueError, match="FASTLORA_DEQUANT_BUFFER_MB"):
        buffer.cap_bytes()
    with pytest.raises(ValueError, match="cap"):
        buffer.set_dequant_buffer_cap_mb(-1)


def test_small_m_threshold_matches_the_forward():
    assert dispatch.SMALL_M_MAX == launch_forward.SMALL_M_MAX
    assert dispatch.GEMV_MAX_M == launch_forward.GEMV_MAX_M


# ----------------------------------------------------------------------------- the cap

@pytest.mark.parametrize("how", ["setter", "env"])
def test_cap_forces_fused(monkeypatch, ran, how):
    """A layer whose buffer would pass the cap takes the fused path even when the dequantize
    path is forced; a layer under it takes the forced path."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    small, large = layer_case(n=32, k=128), layer_case(n=N, k=256, seed=1)
    cap_mb = (32 * 128 * 2 + 1) / 2**20  # the small layer's bf16 buffer fits, the large not
    if how == "setter":
        buffer.set_dequant_buffer_cap_mb(cap_mb)
    else:
        monkeypatch.setenv("FASTLORA_DEQUANT_BUFFER_MB", repr(cap_mb))
    assert buffer.fits(32, 128, DTYPE) and not buffer.fits(N, 256, DTYPE)
    forward(large)
    dx_of(large)
    assert ran == [("forward", "fused"), ("dx", "fused")]
    assert buffer.allocated_bytes() == 0
    forward(small)
    assert ran[-1] == ("forward", "dequant")
    assert buffer.allocated_bytes() == 32 * 128 * 2
    buffer.set_dequant_buffer_cap_mb(0)  # a lower cap frees a buffer now past it
    assert buffer.allocated_bytes() == 0


# ----------------------------------------------------------------------------- the buffer

def test_buffer_is_shared_grown_and_overwritten(monkeypatch):
    """One buffer per dtype for every layer: a smaller layer reuses it (same storage), a larger
    one grows it to its size (never one buffer per layer), and every call rewrites it, so a
    layer's output never depends on which layer ran before."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    a, b, c = layer_case(n=48, k=128, seed=1), layer_case(n=N, k=256, seed=2), \
        layer_case(n=16, k=64, seed=3)

    def storage():
        (flat,) = buffer._BUFFERS.values()
        return flat.data_ptr(), flat.numel()

    ya, _ = forward(a)
    assert storage()[1] == 48 * 128
    dx_of(a)
    first = storage()
    forward(b)
    grown = storage()
    assert grown[1] == N * 256 and len(buffer._BUFFERS) == 1
    forward(c)
    dx_of(c)
    assert storage() == grown, "a smaller layer reallocated the buffer"
    assert buffer.allocated_bytes() == N * 256 * 2  # the largest layer, once
    ya_again, _ = forward(a)
    assert torch.equal(ya, ya_again)
    assert first[1] < grown[1]
    # the buffer holds the last layer's weight, nothing else: no per-layer copy survives
    assert torch.equal(buffer._BUFFERS[next(iter(buffer._BUFFERS))][: 48 * 128].view(48, 128),
                       dequantize_4bit_torch(a.packed, a.state, DTYPE))
    y32, _ = launch_forward.lora_forward(*a.args(torch.float32), 0.0, 0)
    assert len(buffer._BUFFERS) == 2  # per dtype
    assert y32.dtype == torch.float32


def test_release_and_unpatch_free_the_buffer(monkeypatch):
    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    forward(layer_case())
    held = buffer.allocated_bytes()
    assert held == N * 128 * 2
    assert fastlora.release_dequant_buffer() == held
    assert buffer.allocated_bytes() == 0
    forward(layer_case())
    assert buffer.allocated_bytes() == held

    model = nn.Sequential(nn.Linear(4, 4))
    model[0].forward = peft_patch._FusedForward(model[0])  # what patch installs
    assert fastlora.unpatch(model) == 1
    assert buffer.allocated_bytes() == 0


def test_dequantize_out_argument():
    case = layer_case()
    out = torch.full((N, 128), float("nan"), dtype=DTYPE, device=DEVICE)
    assert dequantize_4bit_triton(case.packed, case.state, DTYPE, out=out) is out
    assert torch.equal(out, dequantize_4bit_torch(case.packed, case.state, DTYPE))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_4bit_triton(case.packed, case.state, DTYPE, out=out.t())
    with pytest.raises(ValueError, match="out must be"):
        dequantize_4bit_triton(case.packed, case.state, torch.float16, out=out)


# ----------------------------------------------------------------------------- the dispatcher

@pytest.fixture
def timer(monkeypatch):
    """The dispatcher as on a GPU (auto times both paths, and the one-pass forward where it
    can serve the call), with do_bench replaced: each candidate runs once per timing and takes
    the time `times[(role, path)]`."""
    times = {("forward", "fused"): 2.0, ("forward", "dequant"): 1.0,
             ("forward", "one_pass"): 3.0, ("dx", "fused"): 1.0, ("dx", "dequant"): 3.0}
    timed = []

    def fake_time(fn):
        fn()
        role, path = timed_as[0]
        timed.append((role, path))
        return times[(role, path)]
    timed_as = []
    tag_dispatch_candidates(monkeypatch, timed_as)
    monkeypatch.setattr(dispatch, "_time_ms", fake_time)
    monkeypatch.setattr(dispatch, "_can_time", lambda device: True)
    return times, timed


def test_dispatcher_times_both_once_and_keeps_the_pick(timer, ran):
    times, timed = timer
    case = layer_case(m=20)
    truth, baseline = reference_pair(case, DTYPE)
    y, _ = forward(case)
    assert_close("y (dispatched)", y, truth["y"], baseline["y"])
    # bf16, no dropout, K on the blocksize: the one-pass forward is timed too (issue 30)
    assert timed == [("forward", "fused"), ("forward", "dequant"), ("forward", "one_pass")]
    # warm-up of both (autotuning first), the timing, then the pick on the real output
    assert ran == [("forward", "fused"), ("forward", "dequant")] * 2 + [("forward", "dequant")]
    dx = dx_of(case)
    assert timed[3:] == [("dx", "fused"), ("dx", "dequant")]
    assert ran[-1] == ("dx", "fused")
    # a dx timed into a scratch copy: the result is the plain fused one (not accumulated 3x)
    assert torch.equal(dx, dx_of(case, base="fused"))
    ran.clear()
    forward(case)
    forward(layer_case(m=25, seed=4))  # same M bucket (32): the kept pick, no timing
    dx_of(case)
    assert len(timed) == 5
    assert ran == [("forward", "dequant"), ("forward", "dequant"), ("dx", "fused")]
    picks = dispatch.picks()
    assert len(picks) == 2
    assert dispatch.pick_for("forward", DEVICE, DTYPE, N, 128, 20, "one_pass") == "dequant"
    assert dispatch.pick_for("dx", DEVICE, DTYPE, N, 128, 31) == "fused"
    assert dispatch.pick_for("forward", DEVICE, DTYPE, N, 128, 100, "one_pass") is None
    assert sorted(sorted(t) for t in dispatch.timings().values()) == [
        ["dequant", "fused"], ["dequant", "fused", "one_pass"]]
    # another M bucket, another dtype: timed anew
    forward(layer_case(m=40, seed=5))
    launch_forward.lora_forward(*case.args(torch.float16), 0.0, 0)
    assert len(timed) == 11 and len(dispatch.picks()) == 4


@pytest.mark.quick
def test_dispatcher_key():
    device = torch.device("cpu")
    assert dispatch.key("forward", device, DTYPE, 4096, 14336, 3000) == \
        ("cpu", "bfloat16", 4096, 14336, 4096, "tiled", "forward")
    # M <= 16 (the small-M fused kernel) and 17..32 share bucket 32 but not the key
    assert dispatch.key("dx", device, DTYPE, 8, 8, 16) != dispatch.key("dx", device, DTYPE,
                                                                       8, 8, 17)
    # the forward at M <= 2 runs the CUDA-core kernel, at 3..16 the split-K one: two keys;
    # dx has no gemv kernel, and a forward at M = 1 with dropout says it runs small_m
    assert [dispatch.key("forward", device, DTYPE, 8, 8, m)[5] for m in (1, 2, 3, 16, 17)] == \
        ["gemv", "gemv", "small_m", "small_m", "tiled"]
    assert dispatch.key("dx", device, DTYPE, 8, 8, 1)[5] == "small_m"
    assert dispatch.key("forward", device, DTYPE, 8, 8, 1, "small_m") == \
        dispatch.key("forward", device, DTYPE, 8, 8, 8)
    with pytest.raises(ValueError, match="role"):
        dispatch.key("dA", device, DTYPE, 8, 8, 16)
    with pytest.raises(ValueError, match="kernel"):
        dispatch.key("forward", device, DTYPE, 8, 8, 1, "cublas")


def test_gemv_and_small_m_forwards_are_timed_apart(timer):
    """A pick timed at M = 8 (split-K tensor-core kernel) does not serve M = 1 (the CUDA-core
    kernel, csrc_triton/gemv.py): each is timed on its own kernel; M = 1 with dropout runs the
    split-K kernel and takes M = 8's pick."""
    times, timed = timer
    forward(layer_case(m=8))
    assert len(timed) == 2
    forward(layer_case(m=1, seed=1))
    assert len(timed) == 4
    keys = dispatch.picks()
    assert sorted(key[5] for key in keys) == ["gemv", "small_m"]
    case = make_case(1, N, 128, 8, DTYPE, "nf4", 64, True, True, 0.1, seed=2)
    launch_forward.lora_forward(*case.args(DTYPE), case.dropout_p, case.seed)
    assert len(timed) == 4 and len(dispatch.picks()) == 2


def test_dispatcher_times_once_when_threads_race(monkeypatch):
    """Eight threads reach an untimed key together: the candidates are timed once, every
    thread gets the same pick."""
    monkeypatch.setattr(dispatch, "_can_time", lambda device: True)
    gate = threading.Barrier(8)
    count = {"timings": 0}

    def slow_time(fn):
        count["timings"] += 1
        fn()
        threading.Event().wait(0.05)  # widen the window a second timer would use
        return float(count["timings"])  # the first candidate (fused) is faster
    monkeypatch.setattr(dispatch, "_time_ms", slow_time)
    out = torch.zeros(4, 4)
    results = []

    def call():
        gate.wait()
        results.append(dispatch.choose("forward", out, lambda t: None, lambda t: None,
                                       n=4, k=4, m=4))
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["fused"] * 8
    assert count["timings"] == 2


def test_no_timing_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setattr(dispatch, "_can_time", lambda device: True)
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: pytest.fail("timed during capture"))
    out = torch.zeros(4, 4)
    assert dispatch.choose("dx", out, lambda t: None, lambda t: None, n=4, k=4, m=4,
                           accumulates=True) == "fused"
    assert dispatch.picks() == {}
