"""What only a CUDA GPU can show: the compiled kernels (inline PTX decode, autotuned configs,
the headline 256-row tiles) at a real layer size against the float64 reference, the
autotuner's restore of dx between timed runs, the dispatcher's timed choice, and CUDA graph
capture. Every test is marked `cuda` (skipped without a GPU, see tests/conftest.py);
benchmarks/gpu_check.sh runs them with `pytest -m cuda`.

The rest of the suite runs on a GPU too (tensors on fastlora.cases.DEVICE), compiled there.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastlora
from fastlora.launch import buffer, dispatch, selfcheck
from fastlora.launch.backward import lora_backward
from fastlora.numerics import assert_close
from helpers import DEVICE, make_case, reference_pair, run

BF16 = torch.bfloat16


def _dy(m: int, n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(DEVICE, BF16)


@pytest.mark.cuda("the decode reads the code table through inline PTX, compiled only")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_self_check_passes_on_this_gpu(monkeypatch, quant_type):
    """The first-call self-check (fastlora/launch/selfcheck.py) run afresh: the compiled
    dequant kernel and both forward paths decode bit for bit like the PyTorch decoder."""
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = selfcheck.decode_ok(DEVICE, quant_type, force=True)
    failed = [str(w.message) for w in caught if "self-check failed" in str(w.message)]
    assert ok is True and not failed, failed


@pytest.mark.cuda("a real layer size (hours in the interpreter) and the autotuned configs")
@pytest.mark.parametrize("m,p", [(1, 0.0), (4096, 0.1)], ids=["M1-decode", "M4096-dropout"])
def test_llama3_q_proj_matches_the_reference(m, p, base_path):
    """Llama-3-8B's q_proj (4096 x 4096, NF4, double quant, blocksize 64, rank 16, bf16),
    forward and backward through fastlora.lora_linear_4bit, within fastlora.numerics' bound of
    the float64 reference: M = 1 takes the split-K small-M kernel, M = 4096 the headline
    256-row tiles the interpreter never runs; each base-product path (fixture base_path)."""
    case = make_case(m, 4096, 4096, 16, BF16, "nf4", 64, True, False, p, seed=1)
    dy = _dy(m, 4096)
    truth, baseline = reference_pair(case, BF16, dy)
    out = run(fastlora.lora_linear_4bit, case, BF16, dy)
    for name in ("y", "dx", "dA", "dB"):
        assert out[name].dtype == BF16, name
        assert_close(name, out[name], truth[name], baseline[name])


@pytest.mark.cuda("the autotuner times configs with CUDA events")
def test_autotuned_dx_equals_its_pick_run_pinned(monkeypatch):
    """The dx kernel adds dy @ deq(W) into dx (holding the LoRA term on entry), so the
    autotuner must restore dx between timed configs (csrc_triton/backward.py RESTORE_VALUE):
    the autotuned dx equals, bit for bit, the same computation with the tuner's pick passed
    as an explicit config (without the restore it is off by several times dy @ deq(W))."""
    from fastlora.launch import common

    monkeypatch.setattr(common, "_TUNERS", {})  # fresh tuners: the configs are timed here
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")  # the dx kernel, not cuBLAS
    case = make_case(256, 512, 512, 16, BF16, "nf4", 64, True, False, 0.0, seed=3)
    x, a, b = (t.to(BF16) for t in (case.x, case.lora_A, case.lora_B))
    dy = _dy(256, 512)

    def dx_of(config=None):
        return lora_backward(dy, x, x @ a.t(), case.packed, case.state, a, b, case.scaling,
                             0.0, 0, True, False, False, config=config)[0]

    tuned = dx_of()
    tuners = [t.tuner for key, t in common._TUNERS.items() if key[:2] == ("backward", "dx")]
    assert len(tuners) == 1, list(common._TUNERS)
    timed = getattr(tuners[0], "configs_timings", None) or {}
    assert len(timed) >= 2, f"{len(timed)} dx config(s) timed: the restore is not exercised"
    best = tuners[0].best_config
    pinned = dx_of({"dx": {**best.kwargs, "num_warps": best.num_warps,
                           "num_stages": best.num_stages}})
    assert torch.equal(tuned, pinned), \
        f"max |diff| {(tuned.float() - pinned.float()).abs().max():.3e} ({best})"


@pytest.mark.cuda("the dispatcher times the two base paths on CUDA devices only")
def test_dispatcher_times_both_paths_and_keeps_the_faster(monkeypatch):
    """FASTLORA_BASE_PATH=auto: the first forward and backward of a shape time the fused and
    the dequantize + cuBLAS path (one key per role; the forward, bf16 without dropout, also the
    one-pass forward), keep the fastest, and give a result within the bound; the next call of
    the same shape times nothing."""
    monkeypatch.delenv("FASTLORA_BASE_PATH", raising=False)
    dispatch.clear_picks()
    try:
        case = make_case(512, 1024, 1024, 16, BF16, "nf4", 64, True, True, 0.0, seed=4)
        dy = _dy(512, 1024)
        truth, baseline = reference_pair(case, BF16, dy)
        out = run(fastlora.lora_linear_4bit, case, BF16, dy)
        for name in ("y", "dx", "dA", "dB", "dbias"):
            assert_close(name, out[name], truth[name], baseline[name])
        timings, picks = dispatch.timings(), dispatch.picks()
        assert sorted(key[-1] for key in timings) == ["dx", "forward"], timings
        for key, times in timings.items():
            assert set(times) == {"fused", "dequant"} | (
                {"one_pass"} if key[-1] == "forward" else set()), times
            assert all(math.isfinite(ms) and ms > 0 for ms in times.values()), times
            assert picks[key] == min(times, key=times.get), (key, times, picks[key])
        run(fastlora.lora_linear_4bit, case, BF16, dy)
        assert dispatch.timings() == timings, "the same shape was timed again"
    finally:
        dispatch.clear_picks()
        buffer.release_dequant_buffer()


@pytest.mark.cuda("CUDA graph capture")
def test_cuda_graph_replays_the_eager_result(monkeypatch):
    """With dropout 0 a captured forward replays, on new input, exactly the eager result."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    case = make_case(64, 256, 512, 16, BF16, "nf4", 64, True, True, 0.0, seed=6)
    x, packed, state, a, b, s, bias = case.args(BF16)

    def forward(inp, **kwargs):
        return fastlora.lora_linear_4bit(inp, packed, state, a, b, s, bias, **kwargs)

    static_x = x.clone()
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, BF16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune, self-check: before the capture
            for _ in range(2):
                forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = forward(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = forward(fresh)
        assert torch.equal(static_y, eager), \
            f"replay differs by up to {(static_y.float() - eager.float()).abs().max():.3e}"


@pytest.mark.cuda("CUDA graph capture of a training step with dropout")
def test_cuda_graph_replays_dropout_with_a_fresh_mask_each_time(monkeypatch):
    """Issue 30: a training step with dropout (the op draws its seed: fastlora.checks
    seed_tensor, an int64 [1] tensor on the GPU that the kernels read there) captured in a CUDA
    graph, forward and backward. Each replay draws a fresh seed, so a fresh mask, and its
    output and gradients equal, bit for bit, an eager step's run from the CUDA generator state
    the replay started from (the same draw)."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    case = make_case(64, 256, 512, 16, BF16, "nf4", 64, True, False, 0.1, seed=6)
    x, packed, state, a, b, s, _ = case.args(BF16)
    dy = _dy(64, 256)

    def step(a_, b_):
        y = fastlora.lora_linear_4bit(x, packed, state, a_, b_, s, None, 0.1, True)
        y.backward(dy)
        return y
    a.requires_grad_()
    b.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune, self-check: before the capture
        for _ in range(2):
            step(a, b)
            a.grad = b.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(a, b)
    outputs = []
    for _ in range(2):
        before = torch.cuda.get_rng_state()
        graph.replay()
        torch.cuda.synchronize()
        got = (static_y.clone(), a.grad.clone(), b.grad.clone())
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(before)
        a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
        want = (step(a2, b2).detach(), a2.grad, b2.grad)
        torch.cuda.set_rng_state(after)
        for name, g, w in zip(("y", "dA", "dB"), got, want):
            assert torch.equal(g, w), f"replay's {name} != the eager step's from its RNG state"
        outputs.append(got[0])
    assert not torch.equal(outputs[0], outputs[1]), "two replays drew one dropout mask"


@pytest.mark.cuda("CUDA graph capture of a decode step")
def test_cuda_graph_captures_a_patched_decode_step(tmp_path):
    """Generation's decode step (M = 1 token per layer: the small-M path, q/k/v and gate/up as
    fused groups, formed in the warm-up calls) of a patched tiny Llama captured in one CUDA
    graph: replaying it on a new token gives exactly the eager logits (issue 29, part 4)."""
    import tiny_models as tm

    model = tm.add_lora(tm.load_4bit(tm.save_tiny_llama(tmp_path / "llama"))).eval()
    report = fastlora.patch(model)
    assert report.patched == 14
    static_ids = torch.tensor([[7]], device=DEVICE)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune, self-check, groups: before capture
            for _ in range(3):
                model(static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        assert report.groups == {2: 2, 3: 2}, report
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(static_ids, use_cache=False).logits
        static_ids.fill_(42)
        graph.replay()
        torch.cuda.synchronize()
        eager = model(static_ids, use_cache=False).logits
    assert torch.equal(static_logits, eager), \
        f"replay differs by up to {(static_logits - eager).abs().max():.3e}"
