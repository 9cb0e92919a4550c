"""The GPU decode self-check (fastlora/launch/selfcheck.py), run on the CPU (and on a GPU).

The check is forced (it does no work off CUDA otherwise), so on the CPU the real kernels run in
Triton's interpreter against the PyTorch decoder (on a GPU: the compiled kernels, inline PTX
included); launchers are corrupted with monkeypatch to show that a mismatch is caught, warned
about once, cached per (device, quant_type), and that the dispatch then runs the reference path.
"""

import warnings

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.launch import dequant as dequant_launch
from fastlora.launch import forward as forward_launch
from fastlora.launch import selfcheck
from helpers import DEVICE

QUANTS = ["nf4", "fp4"]
HERE = selfcheck._device(DEVICE)  # the device the kernels run on: cpu, or cuda:<current>


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Every test starts with no cached answer and leaves none behind."""
    monkeypatch.setattr(selfcheck, "_RESULTS", {})


def _perturbed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] += 1.0  # one value off (the check's values are below 8 in magnitude)
    return t


def _counting(monkeypatch, module, name, calls: list, corrupt=lambda kwargs: False):
    """Replace module.name by a wrapper that records its calls and perturbs the first output
    when corrupt(kwargs)."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("path", name))
        out = real(*args, **kwargs)
        if not corrupt(kwargs):
            return out
        return (_perturbed(out[0]), *out[1:]) if isinstance(out, tuple) else _perturbed(out)
    monkeypatch.setattr(module, name, wrapper)


def _record_warnings():
    rec = warnings.catch_warnings(record=True)
    caught = rec.__enter__()
    warnings.simplefilter("always")  # Python's own once-per-location filter hides nothing
    return rec, caught


@pytest.mark.quick
@pytest.mark.parametrize("quant_type", QUANTS)
def test_check_passes_on_the_real_kernels(monkeypatch, quant_type):
    calls = []
    _counting(monkeypatch, dequant_launch, "dequantize_4bit_triton", calls)
    _counting(monkeypatch, forward_launch, "lora_forward", calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.decode_ok(DEVICE, quant_type, force=True) is True
    # every decoding path ran, through the K-aligned word path
    assert calls == ["dequantize_4bit_triton", "tiled", "one_pass", "small_m"] + ["gemv"] * 8
    cols = selfcheck.SMALL_M_COLUMNS
    assert selfcheck.K % selfcheck.BLOCKSIZE == 0 and selfcheck.K % 8 == 0
    assert len(set(cols)) == 16 and max(cols) < selfcheck.K
    assert {c // selfcheck.BLOCKSIZE for c in cols} == set(range(selfcheck.K // 64))
    assert {c % 2 for c in cols} == {0, 1}  # high and low nibbles
    assert selfcheck._RESULTS == {(str(HERE), quant_type): True}


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"])
def test_gpu_configs_are_valid_explicit_configs(monkeypatch, arch):
    """On a GPU the check launches one explicit config per path (no autotuning for its own
    shapes): they must be what lora_forward accepts, on every compile target."""
    from fastlora.gpus import CONFIG_FAMILY
    from fastlora.launch import common

    monkeypatch.setattr(selfcheck.backend, "interpreter_active", lambda: False)
    monkeypatch.setattr(common, "compile_arch", lambda device: arch)
    monkeypatch.setattr(common, "arch", lambda device: CONFIG_FAMILY[arch])
    tiled, small, gemv, one_pass = selfcheck._configs(torch.device("cuda", 0))
    assert set(tiled) == set(one_pass) == set(forward_launch.TILED_KEYS)
    for cfg, keys in ((small, forward_launch.SMALL_M_KEYS), (gemv, forward_launch.GEMV_KEYS)):
        assert set(cfg) == set(keys) and cfg["SPLIT_K"] == 2
        assert selfcheck.K % cfg["BLOCK_K"] == 0 and selfcheck.K // cfg["BLOCK_K"] >= 2


@pytest.mark.quick
def test_no_work_off_gpu_unless_forced(monkeypatch):
    monkeypatch.setattr(selfcheck, "_check", lambda *a: pytest.fail("the check ran"))
    assert selfcheck.decode_ok("cpu", "nf4") is True
    assert selfcheck.decode_ok(torch.device("cpu"), "fp4", force=False) is True
    assert selfcheck._RESULTS == {}


@pytest.mark.parametrize("broken", ["dequant", "tiled", "one_pass", "small_m", "gemv"])
def test_mismatch_warns_once_and_dispatch_runs_the_reference(monkeypatch, broken):
    calls = []
    _counting(monkeypatch, dequant_launch, "dequantize_4bit_triton", calls,
              corrupt=lambda kw: broken == "dequant")
    _counting(monkeypatch, forward_launch, "lora_forward", calls,
              corrupt=lambda kw: kw.get("path") == broken)
    rec, caught = _record_warnings()
    try:
        assert selfcheck.decode_ok(DEVICE, "nf4", force=True) is False
        assert selfcheck.decode_ok(DEVICE, "nf4", force=True) is False  # cached: no second run
    finally:
        rec.__exit__(None, None, None)
    ran = {"dequant": 1, "tiled": 2, "one_pass": 3, "small_m": 4, "gemv": 5}[broken]
    assert len(calls) == ran, calls
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert caught[0].category is RuntimeWarning
    what = {"dequant": "dequant kernel", "tiled": "tiled forward",
            "one_pass": "one-pass forward", "small_m": "small-M forward",
            "gemv": "M <= 2 (CUDA-core) forward"}[broken]
    assert f"({HERE})" in msg and "'nf4'" in msg and what in msg, msg
    assert "falls back to the PyTorch reference path" in msg, msg

    # the dispatch (auto backend, interpreter active) now sends nf4 calls to the reference
    monkeypatch.setattr(selfcheck, "FORCE", True)
    calls.clear()
    monkeypatch.setattr(forward_launch, "lora_forward",
                        lambda *a, **k: pytest.fail("the fused forward ran"))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g).to(DEVICE)
    packed, state = fastlora.quantize_4bit(w, "nf4")
    x, a, b = (torch.randn(*shape, generator=g).to(DEVICE)
               for shape in ((3, 64), (4, 64), (16, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning
        deq = fastlora.dequantize_4bit(packed, state)
        y = fastlora.lora_linear_4bit(x, packed, state, a, b, 0.5)
    assert calls == []  # the (counting) dequant launcher was not called
    assert torch.equal(deq, fastlora.quant.dequantize_4bit_torch(packed, state))
    assert torch.equal(y, reference.lora_linear_4bit(x, packed, state, a, b, 0.5))

    # fp4 has its own answer: still the kernels (stubbed check: it passes)
    monkeypatch.setattr(selfcheck, "_check", lambda device, quant_type: None)
    packed4, state4 = fastlora.quantize_4bit(w, "fp4")
    fastlora.dequantize_4bit(packed4, state4)
    assert calls == ["dequantize_4bit_triton"]


def test_cache_is_per_device_and_quant_type(monkeypatch):
    seen = []

    def fake_check(device, quant_type):
        seen.append((str(device), quant_type))
        return "stub mismatch" if quant_type == "fp4" else None
    monkeypatch.setattr(selfcheck, "_check", fake_check)
    rec, caught = _record_warnings()
    try:
        assert selfcheck.decode_ok("cpu", "nf4", force=True)
        assert selfcheck.decode_ok(torch.device("cpu"), "nf4", force=True)
        assert not selfcheck.decode_ok("cpu", "fp4", force=True)
        assert not selfcheck.decode_ok("cpu", "fp4", force=True)
        assert selfcheck.decode_ok("meta", "nf4", force=True)
        assert not selfcheck.decode_ok("meta", "fp4", force=True)
    finally:
        rec.__exit__(None, None, None)
    assert seen == [("cpu", "nf4"), ("cpu", "fp4"), ("meta", "nf4"), ("meta", "fp4")]
    assert len(caught) == 2  # one per failing (device, quant_type)
    assert "(cpu)" in str(caught[0].message) and "(meta)" in str(caught[1].message)
    assert all("'fp4'" in str(w.message) and "stub mismatch" in str(w.message) for w in caught)


def test_threads_racing_to_the_first_call_run_one_check(monkeypatch):
    import threading
    import time

    seen = []

    def slow_check(device, quant_type):
        seen.append(quant_type)
        time.sleep(0.05)  # long enough for every thread to arrive while it runs
        return None
    monkeypatch.setattr(selfcheck, "_check", slow_check)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        selfcheck.decode_ok("cpu", "nf4", force=True))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and seen == ["nf4"]


def test_an_exception_is_a_failed_check(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("illegal instruction")
    monkeypatch.setattr(dequant_launch, "dequantize_4bit_triton", boom)
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: illegal instruction"):
        assert selfcheck.decode_ok("cpu", "nf4", force=True) is False


@pytest.mark.filterwarnings("ignore:Dynamo detected a call:UserWarning")  # the reference's
def test_torch_compile_sees_a_constant(monkeypatch):
    """Dynamo runs decode_ok eagerly while tracing (torch.compiler.assume_constant_result's
    marker, set without importing torch._dynamo): fullgraph compiles, the failed check routes
    the compiled call to the reference."""
    probe = torch.compiler.assume_constant_result(lambda: None)
    assert getattr(probe, "_dynamo_marked_constant", False) is True
    assert getattr(selfcheck.decode_ok, "_dynamo_marked_constant", False) is True

    monkeypatch.setattr(selfcheck, "FORCE", True)
    seen = []
    monkeypatch.setattr(selfcheck, "_check", lambda *a: seen.append(a) or "stub mismatch")
    monkeypatch.setattr(forward_launch, "lora_forward",
                        lambda *a, **k: pytest.fail("the fused forward ran"))
    g = torch.Generator().manual_seed(2)
    packed, state = fastlora.quantize_4bit(torch.randn(16, 64, generator=g).to(DEVICE), "nf4")
    x, a, b = (torch.randn(*shape, generator=g).to(DEVICE)
               for shape in ((3, 64), (4, 64), (16, 4)))
    fn = torch.compile(lambda x_: fastlora.lora_linear_4bit(x_, packed, state, a, b, 0.5),
                       fullgraph=True, backend="eager")
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        y = fn(x)
    assert len(seen) == 1
    assert torch.allclose(y, reference.lora_linear_4bit(x, packed, state, a, b, 0.5),
                          rtol=1e-6, atol=1e-6)
