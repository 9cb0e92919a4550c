"""Hardening (issue 7): property-based equivalence with fastlora.reference, numerics (NaN/Inf,
fp16 overflow, config independence), concurrency and references to user tensors.

The bad-input battery is tests/test_bad_input.py; large-index safety tests/test_large_index.py
(run time) and tests/test_compile.py (TTIR).

Hypothesis budget: FASTLORA_HYPOTHESIS_EXAMPLES examples (default 8, derandomised so CI is
reproducible); FASTLORA_HYPOTHESIS_RANDOM=1 draws fresh examples, e.g. for a long local run:
    FASTLORA_HYPOTHESIS_EXAMPLES=200 FASTLORA_HYPOTHESIS_RANDOM=1 pytest tests/test_hardening.py
Failing examples found that way are added below as @example regression cases.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import bitsandbytes.functional as bnbF
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastlora
from fastlora import backend
from fastlora.launch.backward import lora_backward
from fastlora.launch.forward import lora_forward
from fastlora.numerics import compare
from helpers import DEVICE, DTYPES, make_case, reference_pair, run

pytestmark = pytest.mark.skipif(not (backend.interpreter_active() or torch.cuda.is_available()),
                                reason="needs the Triton kernels (GPU or interpreter)")

GRADS = ("y", "dx", "dA", "dB", "dbias")


def _check_all(case, dtype, dy, fused_out):
    truth, baseline = reference_pair(case, dtype, dy)
    bad = [compare(name, fused_out[name], truth[name], baseline[name], dtype)
           for name in GRADS if truth.get(name) is not None]
    assert all(c.ok for c in bad), "\n".join(c.message() for c in bad if not c.ok)


# ----------------------------------------------------------------------------- property test

CASES = st.fixed_dictionaries({
    "m": st.integers(1, 300), "n": st.integers(1, 300), "k": st.integers(1, 300),
    "rank": st.integers(1, 64), "dtype": st.sampled_from(sorted(DTYPES)),
    "quant": st.sampled_from(["nf4", "fp4"]), "dq": st.booleans(),
    "bs": st.sampled_from([32, 64, 128, 256]), "bias": st.booleans(),
    "p": st.sampled_from([0.0, 0.1, 0.5]), "lead": st.sampled_from([(), (2,)]),
    "layout": st.sampled_from(["contiguous", "column-slice", "transposed"]),
    "seed": st.integers(0, 2**31 - 1),
})


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x in a non-contiguous view (or x itself)."""
    if layout == "column-slice":
        wide = x.new_zeros(*x.shape[:-1], x.shape[-1] + 7)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


@settings(max_examples=int(os.environ.get("FASTLORA_HYPOTHESIS_EXAMPLES", "8")), deadline=None,
          derandomize=os.environ.get("FASTLORA_HYPOTHESIS_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(c=CASES)
@example(c={"m": 1, "n": 1, "k": 1, "rank": 1, "dtype": "bf16", "quant": "nf4", "dq": True,
            "bs": 32, "bias": True, "p": 0.5, "lead": (), "layout": "contiguous", "seed": 0})
@example(c={"m": 300, "n": 17, "k": 300, "rank": 64, "dtype": "fp16", "quant": "fp4",
            "dq": False, "bs": 256, "bias": False, "p": 0.1, "lead": (2,),
            "layout": "transposed", "seed": 7})
# fp32 and blocksizes 64/128 with x reaching the kernels strided: a column-major 2-D x, and a
# 3-D column slice (whose leading dims fold into M without a copy)
@example(c={"m": 37, "n": 45, "k": 130, "rank": 12, "dtype": "fp32", "quant": "nf4",
            "dq": True, "bs": 64, "bias": True, "p": 0.1, "lead": (), "layout": "transposed",
            "seed": 11})
@example(c={"m": 19, "n": 33, "k": 256, "rank": 5, "dtype": "fp32", "quant": "fp4",
            "dq": False, "bs": 128, "bias": False, "p": 0.0, "lead": (2,),
            "layout": "column-slice", "seed": 12})
def test_fused_equals_reference_on_random_layers(c):
    dtype = DTYPES[c["dtype"]]
    case = make_case(c["m"], c["n"], c["k"], c["rank"], dtype, c["quant"], c["bs"], c["dq"],
                     c["bias"], c["p"], seed=c["seed"] % 1000, lead=c["lead"])
    case.x = _laid_out(case.x, c["layout"])
    dy = torch.randn(*c["lead"], c["m"], c["n"], generator=torch.Generator().manual_seed(1))
    _check_all(case, dtype, dy, run(fastlora.lora_linear_4bit, case, dtype, dy))


# ----------------------------------------------------------------------------- NaN / Inf

def _poison(case, where: str, value: float):
    if where == "x":
        case.x[1, 3] = value
    elif where == "A":
        case.lora_A[0, 5] = value
    elif where == "B":
        case.lora_B[4, 0] = value
    elif where == "weight":
        w = (torch.randn(40, 64, generator=torch.Generator().manual_seed(3)) * 0.05).to(DEVICE)
        w[7, 9] = value
        case.packed, state = bnbF.quantize_4bit(w.to(case.x.dtype), blocksize=64,
                                                quant_type="nf4", compress_statistics=False)
        case.state = fastlora.QuantState.from_bnb(state)
    return case


def _nonfinite_pattern(t):
    return torch.stack([t.isnan(), t == float("inf"), t == -float("inf")])


@pytest.mark.parametrize("m", [3, 20], ids=["small-m", "tiled"])
@pytest.mark.parametrize("where,value", [("x", float("nan")), ("x", float("inf")),
                                         ("A", float("nan")), ("B", -float("inf")),
                                         ("weight", float("nan")), ("weight", float("inf"))],
                         ids=["x-nan", "x-inf", "A-nan", "B--inf", "W-nan", "W-inf"])
def test_nan_and_inf_propagate_as_in_the_reference(where, value, m):
    dtype = torch.bfloat16
    case = _poison(make_case(m, 40, 64, 4, dtype, "nf4", 64, False, True), where, value)
    dy = torch.randn(m, 40, generator=torch.Generator().manual_seed(2))
    fused = run(fastlora.lora_linear_4bit, case, dtype, dy)
    ref = run(fastlora.reference.lora_linear_4bit, case, dtype, dy)
    assert _nonfinite_pattern(ref["y"]).any(), "the poison did not reach the output"
    for name in GRADS:
        got, want = _nonfinite_pattern(fused[name]), _nonfinite_pattern(ref[name])
        assert torch.equal(got, want), (
            f"{name}: NaN/+Inf/-Inf at {int(got.sum())} places, reference at {int(want.sum())}")


@pytest.mark.parametrize("m", [3, 20], ids=["small-m", "tiled"])
def test_fp16_overflow_behaves_as_plain_pytorch(m):
    """Row 1's output exceeds fp16's 65504: inf where plain PyTorch fp16 gives inf, the same
    finite values elsewhere (within the usual bound)."""
    dtype = torch.float16
    case = make_case(m, 40, 64, 4, dtype, "nf4", 64, True, False)
    w = torch.rand(40, 64, generator=torch.Generator().manual_seed(4)) + 0.5
    packed, state = bnbF.quantize_4bit(w.to(DEVICE, dtype), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    case.packed, case.state = packed, fastlora.QuantState.from_bnb(state)
    case.x[1] = 2000.0  # y[1, :] ~ 2000 * 64 * 0.9 > 65504
    fused = run(fastlora.lora_linear_4bit, case, dtype)["y"]
    truth, plain = reference_pair(case, dtype)
    assert torch.equal(fused.isinf(), plain["y"].isinf()) and bool(fused[1].isinf().all())
    finite = ~plain["y"].isinf()
    result = compare("y (finite part)", fused[finite], truth["y"][finite], plain["y"][finite])
    assert result.ok, result.message()


# ----------------------------------------------------------------------------- configs

def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the dtype's spacing at the tensor's scale (max |a|): a different
    fp32 summation order moves a result by rounding errors of the summands' size, which can be
    many ulps of a single small element that came out of cancellation."""
    scale = float(a.float().abs().max()) * torch.finfo(a.dtype).eps
    return float((a.float() - b.float()).abs().max()) / max(scale, 1e-30)


FORWARD_CONFIGS = [
    ("tiled", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "W_FIRST": False,
               "num_warps": 4, "num_stages": 1}),
    ("tiled", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1, "W_FIRST": True,
               "num_warps": 4, "num_stages": 1}),
    ("small_m", {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1}),
]


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_results_do_not_depend_on_the_config(dtype):
    """Configs (tile shapes, orientation, split-K) give outputs within one rounding of the
    output dtype of each other, fp32 accumulation order being all that differs; the split-K
    config within two: it adds its 3 slices' fp32 partials, then the LoRA term and the bias,
    after the K loops, 4 more fp32 additions at the output's scale than a tiled config makes
    (half an ulp each; fp32 outputs came 1.47 ulps apart on an AVX2 EPYC, where numpy's fp32
    matmul, the interpreter's dot, orders its sums otherwise than where 1.0 was first met)."""
    dtype = DTYPES[dtype]
    case = make_case(16, 72, 256, 8, dtype, "nf4", 64, True, True, 0.1)
    args = (*case.args(dtype), case.dropout_p, case.seed)
    ys = [lora_forward(*args, path=path, config=cfg)[0] for path, cfg in FORWARD_CONFIGS]
    for (path, _), other in zip(FORWARD_CONFIGS[1:], ys[1:]):
        assert _ulps_apart(ys[0], other) <= (2.0 if path == "small_m" else 1.0), path
    dy = torch.randn(16, 72, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    u = lora_forward(*args)[1]
    grads = [lora_backward(dy, case.x.to(dtype), u, case.packed, case.state,
                           case.lora_A.to(dtype), case.lora_B.to(dtype), case.scaling,
                           case.dropout_p, case.seed, True, True, True, config=cfg)
             for cfg in (None, {
                 "du_db": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
                 "da": {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
                 "dx": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1,
                        "num_warps": 4, "num_stages": 1}})]
    for name, a, b in zip(("dx", "dA", "dB"), *grads):
        assert _ulps_apart(a, b) <= 2.0, name  # dx: two roundings (LoRA term, then the sum)


# ----------------------------------------------------------------------------- state

def test_two_threads_at_once_give_the_sequential_results():
    cases = [make_case(20, 40, 64, 4, torch.bfloat16, "nf4", 64, True, True, 0.1, seed=s)
             for s in (1, 2)]
    dys = [torch.randn(20, 40, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    sequential = [run(fastlora.lora_linear_4bit, c, torch.bfloat16, d) for c, d in zip(cases, dys)]
    results = [None, None]
    errors = []

    def worker(i):
        try:
            for _ in range(2):
                results[i] = run(fastlora.lora_linear_4bit, cases[i], torch.bfloat16, dys[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for got, want in zip(results, sequential):
        for name in GRADS:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.quick
def test_autotuner_cache_builds_once_under_a_race():
    from fastlora.launch.common import cached_autotuner

    built, barrier = [], threading.Barrier(8)

    def build():
        built.append(1)
        return object()

    def worker(out):
        barrier.wait()
        out.append(cached_autotuner(("test", "race"), build))

    got = []
    threads = [threading.Thread(target=worker, args=(got,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len({id(g) for g in got}) == 1


def test_locked_tuner_keeps_each_threads_arguments():
    """Triton's Autotuner.run keeps the call's arguments on the shared instance (self.nargs)
    and resets them to None when it returns; this stub does the same, with a pause in between
    (timing configs). Through LockedTuner each thread gets its own arguments back; without it,
    threads that meet inside `run` (a rendezvous, so the overlap does not depend on timing)
    read one another's."""
    from fastlora.launch.common import LockedTuner

    class SharedStateTuner:
        nargs = None

        def __init__(self, rendezvous=None):
            self.rendezvous = rendezvous

        def __getitem__(self, grid):
            return self.run

        def run(self, value):
            self.nargs = value
            if self.rendezvous is not None:
                self.rendezvous.wait(timeout=60)  # every thread is inside run now
            time.sleep(0.02)
            seen, self.nargs = self.nargs, None
            return seen

    def race(tuner) -> list:
        out, start = {}, threading.Barrier(4)

        def worker(i):
            start.wait()
            out[i] = tuner[None](i)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [out[i] for i in range(4)]

    assert race(LockedTuner(SharedStateTuner())) == [0, 1, 2, 3]
    mixed = race(SharedStateTuner(rendezvous=threading.Barrier(4)))
    assert mixed != [0, 1, 2, 3], "the hazard is real without the lock"


@triton.jit
def _plus_block_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + BLOCK: which config ran shows in the output."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x + BLOCK, mask=offs < n)


def test_an_untuned_shape_inside_graph_capture_takes_the_default_config(monkeypatch, caplog):
    """Issue 29: inside CUDA graph capture nothing may be timed. A LockedTuner call whose
    shape Triton's Autotuner has no pick for launches the first config its pruning keeps,
    times nothing, caches nothing and logs that once per kernel; a shape it has picked for
    launches its pick; outside capture it autotunes as before. (Capture is faked: the
    interpreter runs the launches.)"""
    import logging

    from fastlora.launch import common

    monkeypatch.setattr(common, "_capture_defaults_logged", set())
    configs = [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 32}),
               triton.Config({"BLOCK": 16})]
    pruned = []

    def prune(configs_, nargs, **kwargs):
        pruned.append(nargs["n"])
        return configs_[1:]  # the default is then BLOCK 32
    tuner = common.LockedTuner(triton.autotune(
        configs, key=["n"], prune_configs_by={"early_config_prune": prune})(_plus_block_kernel))
    x = torch.zeros(100, device=DEVICE)
    grid = lambda meta: (triton.cdiv(100, meta["BLOCK"]),)  # noqa: E731

    def bench_forbidden(*args, **kwargs):
        raise AssertionError("a config was timed inside capture")
    # do_bench is a cached property: set on the instance, as Triton's own cache would hold it
    monkeypatch.setitem(tuner.tuner.__dict__, "do_bench", bench_forbidden)
    monkeypatch.setattr(common, "capture_underway", lambda: True)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        for _ in range(2):
            out = torch.empty(100, device=DEVICE)
            tuner[grid](x, out, 100)
            assert torch.equal(out, torch.full((100,), 32.0, device=DEVICE))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "_plus_block_kernel" in warned[0] and "BLOCK: 32" in warned[0]
    assert tuner.tuner.cache == {} and pruned == [100, 100]
    tuner.tuner.cache[(100, "torch.float32", "torch.float32")] = configs[2]  # a pick
    out = torch.empty(100, device=DEVICE)
    tuner[grid](x, out, 100)
    assert torch.equal(out, torch.full((100,), 16.0, device=DEVICE)) and pruned == [100, 100]
    monkeypatch.setattr(common, "capture_underway", lambda: False)
    monkeypatch.setitem(tuner.tuner.__dict__, "do_bench", _cpu_bench)
    out = torch.empty(50, device=DEVICE)
    tuner[lambda meta: (triton.cdiv(50, meta["BLOCK"]),)](x, out, 50)  # eager: autotunes
    assert (50, "torch.float32", "torch.float32") in tuner.tuner.cache


def _cpu_bench(kernel_call, quantiles):
    """The autotuner's do_bench on a CPU (it has no driver there): three timed calls."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append(time.perf_counter() - start)
    times.sort()
    return [times[1], times[0], times[2]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: runs the GPU's autotuned path "
                    "in the interpreter (on a GPU: tests/test_gpu.py, the tuner's pick pinned)")
def test_autotuned_dx_equals_the_fixed_config(monkeypatch):
    """The dx kernel adds dy @ deq(W) into dx (which holds the LoRA term on entry), so the
    autotuner must restore dx after each timed run. Runs the GPU's autotuned path in the
    interpreter, with two small dx configs timed on the CPU: the result must be the
    fixed-config result bit for bit (without the restore it is off by several times dx)."""
    from csrc_triton import backward as kernels
    from fastlora.launch import backward as launch, common

    case = make_case(40, 48, 64, 4, torch.bfloat16, "nf4", 64, True, False, 0.0, seed=3)
    dy = torch.randn(40, 48, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)

    def dx_of():
        x, a, b = (t.to(torch.bfloat16) for t in (case.x, case.lora_A, case.lora_B))
        u = x @ a.t()
        return lora_backward(dy, x, u, case.packed, case.state, a, b, case.scaling, 0.0, 0,
                             True, False, False)[0]
    want = dx_of()

    tuned = ("sm_80", False, "tf32")  # (arch, fp32 activations, dot precision)
    configs = [kernels._cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4),
               kernels._cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    monkeypatch.setitem(kernels.CONFIGS["dx"], tuned[:2], configs)
    monkeypatch.setattr(common, "_TUNERS", {})
    build = kernels.build_autotuner
    built = []

    def build_on_cpu(*args):
        built.append(tuner := build(*args))
        tuner.do_bench = _cpu_bench
        return tuner
    monkeypatch.setattr(kernels, "build_autotuner", build_on_cpu)
    init = launch.Configs.__init__

    def tuned_dx(self, x, config):
        init(self, x, config)
        del self.fixed["dx"]
        self.tuned = tuned
    monkeypatch.setattr(launch.Configs, "__init__", tuned_dx)

    got = dx_of()
    assert len(built) == 1 and len(built[0].configs_timings) == 2, "both configs were timed"
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "fwd+bwd"])
def test_no_reference_to_user_tensors_is_kept(grad):
    case = make_case(20, 40, 64, 4, torch.bfloat16, "nf4", 64, True, True, 0.1)
    x, packed, state, a, b, s, bias = case.args(torch.bfloat16, requires_grad=grad)
    refs = [weakref.ref(t) for t in (x, packed, a, b, bias)]
    with torch.set_grad_enabled(grad):
        y = fastlora.lora_linear_4bit(x, packed, state, a, b, s, bias, dropout_p=0.1,
                                      training=True, seed=3)
        if grad:
            y.sum().backward()
    del x, packed, a, b, bias, y, case
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"tensors {alive} (x, packed, A, B, bias) are still referenced"


HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def _count_host_reads(monkeypatch) -> list:
    """Patches torch.Tensor's ways of reading a value on the host (.item(), .tolist(), int(),
    float(), bool(), operator.index()): the calls that wait for a GPU and that a CUDA graph
    cannot replay. Returns the list the patched methods append their names to. (A
    TorchDispatchMode would not do: it does not see inside a custom op's body.)"""
    reads = []
    for name in HOST_READS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, __method=method, __name=name, **kwargs):
            reads.append(__name)
            return __method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("op", ["linear", "group"])
def test_dropout_seed_is_never_read_on_the_host(op, monkeypatch):
    """Issue 30: with dropout the op draws its seed as an int64 [1] tensor on x's device
    (fastlora.checks.seed_tensor) and the kernels read it there: the fused forward and backward
    read no tensor's value on the host, so nothing waits for the GPU and a captured CUDA graph
    replays the draw (a fresh mask each replay; capture itself: tests/test_gpu.py). The same
    calls without the fused path's discipline would count: a check that the counter counts."""
    case = make_case(8, 64, 64, 16, torch.float32, dropout_p=0.25, seed=3)
    x, packed, state, a, b, s, bias = case.args(torch.float32, requires_grad=True)
    members = [fastlora.GroupMember(packed, state, a, b, s, dropout_p=0.25),
               fastlora.GroupMember(packed, state, a * 2, b, s, dropout_p=0.5)]
    reads = _count_host_reads(monkeypatch)
    if op == "linear":
        y = fastlora.lora_linear_4bit(x, packed, state, a, b, s, bias, 0.25, True)
        y.square().sum().backward()
    else:
        ys = fastlora.lora_group_4bit(x, members, training=True)
        sum(y.square().sum() for y in ys).backward()
    assert reads == [], f"host reads of a tensor inside the op: {reads}"
    int(torch.randint(0, 9, (1,)))
    assert reads == ["__int__"]  # the counter counts
