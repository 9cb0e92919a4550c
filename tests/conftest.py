"""Test setup: kernels run in Triton's CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported (DESIGN.md), hence at the very top.

On a CUDA machine (TRITON_INTERPRET unset) the same suite runs the compiled kernels: test
tensors live on fastlora.cases.DEVICE. Tests that only make sense on one kind of machine say so:
    @pytest.mark.cuda("what needs the GPU")   skipped without compiled CUDA kernels, with the
                                               reason "needs a CUDA GPU: ..."; `pytest -m cuda`
                                               (benchmarks/gpu_check.sh) runs exactly these
    skipif(torch.cuda.is_available(), reason="CPU-only: ...")   the interpreter / no-GPU paths
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Forced, not defaulted: a FASTLORA_BACKEND=reference left in the shell would make every
# kernel-vs-reference test compare the reference with itself and pass without running a kernel.
os.environ["FASTLORA_BACKEND"] = "auto"
# The base product's path (fastlora/launch/dispatch.py): 'auto', which is the fused path on the
# CPU; a value left in the shell would silently move every fused-path test onto the other one.
os.environ.pop("FASTLORA_BASE_PATH", None)

import pytest  # noqa: E402

from fastlora.backend import interpreter_active  # noqa: E402

# compiled CUDA kernels run here (not the interpreter on CUDA tensors, nor no GPU at all)
CUDA_KERNELS = torch.cuda.is_available() and not interpreter_active()


# The test tiers (README "Developing"): --tier quick | default | full.
#   quick    tests marked `quick`: the main path of every module, for the edit loop (< 2 min)
#   default  everything but the tests marked `full` (README's test command, CI's first phase)
#   full     everything; CI runs the `full`-only tests by rotation (--slice, .ci/run)
TIERS = ("quick", "default", "full")


def pytest_addoption(parser):
    group = parser.getgroup("fastlora")
    group.addoption("--tier", choices=TIERS,
                    default=os.environ.get("FASTLORA_TEST_TIER", "default"),
                    help="which tests run: quick (marked quick), default (all but those marked "
                         "full), full (all). Default: $FASTLORA_TEST_TIER or 'default'")
    group.addoption("--slice", default=None, metavar="I/N",
                    help="keep only slice I (0-based) of N of the selected tests, by a stable "
                         "hash of each test's id (CI's rotation)")
    group.addoption("--shuffle", type=int, default=None, metavar="SEED",
                    help="run the tests in an order shuffled by SEED (tests must not depend on "
                         "each other's order)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda(why): needs a CUDA GPU with compiled kernels (skipped otherwise); "
        "benchmarks/gpu_check.sh runs `pytest -m cuda`")
    config.addinivalue_line(
        "markers", "quick: in the quick tier (--tier quick), the edit loop's main-path checks")
    config.addinivalue_line(
        "markers", "full(why): only in the full tier (--tier full); CI runs these by rotation")


def _select(config, items):
    tier = config.getoption("--tier")
    keep = items
    if tier == "quick":
        keep = [it for it in keep if it.get_closest_marker("quick") is not None]
    elif tier == "default":
        keep = [it for it in keep if it.get_closest_marker("full") is None]
    if config.getoption("--slice"):
        from fastlora.slices import in_slice, parse_slice

        try:
            part = parse_slice(config.getoption("--slice"))
        except ValueError as exc:
            raise pytest.UsageError(f"--slice: {exc}") from None
        keep = [it for it in keep if in_slice(it.nodeid, part)]
    if len(keep) != len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
        items[:] = keep
    seed = config.getoption("--shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)


def pytest_report_header(config):
    parts = [f"fastlora test tier: {config.getoption('--tier')}"]
    if config.getoption("--slice"):
        parts.append(f"slice {config.getoption('--slice')}")
    if config.getoption("--shuffle") is not None:
        parts.append(f"shuffled with seed {config.getoption('--shuffle')}")
    return ", ".join(parts)


def pytest_collection_modifyitems(config, items):
    _select(config, items)
    if CUDA_KERNELS:
        return
    for item in items:
        mark = item.get_closest_marker("cuda")
        if mark is not None:
            why = mark.args[0] if mark.args else "compiled kernels"
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {why}"))


@pytest.fixture(scope="session", autouse=True)
def gpu_decode_self_check():
    """On a GPU, FASTLORA_BACKEND=auto sends a device's calls to the PyTorch reference when the
    kernels' decode self-check fails there (fastlora/launch/selfcheck.py): every
    kernel-vs-reference test would then compare the reference with itself and pass. Stop the
    run instead, saying why."""
    if CUDA_KERNELS:
        import warnings

        from fastlora.cases import DEVICE
        from fastlora.launch import selfcheck

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            failed = [q for q in ("nf4", "fp4") if not selfcheck.decode_ok(DEVICE, q)]
        if failed:
            pytest.exit("the GPU decode self-check failed, so the kernels would not run: "
                        + "; ".join(str(w.message) for w in caught), returncode=1)
    yield


def rotation_index() -> int:
    """The number that picks what a run checks by rotation (the compile record's recheck slice,
    .ci/run's slices): $FASTLORA_ROTATION, else the checked-out commit's hash, else 0."""
    if os.environ.get("FASTLORA_ROTATION"):
        return int(os.environ["FASTLORA_ROTATION"])
    import subprocess

    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))
    return int(done.stdout[:8], 16) if done.returncode == 0 and done.stdout else 0


@pytest.fixture(scope="session")
def rotation() -> int:
    return rotation_index()


@pytest.fixture(autouse=True)
def fresh_log_once_state(monkeypatch):
    """fastlora logs some warnings once per process (a fallback's reason, a group broken up, a
    mixed batch's slow path); a test that waits for one must not find it spent by an earlier
    test on the same worker. Every test starts with the log-once sets empty."""
    from fastlora import backend, grouping, peft_patch
    from fastlora.ops import mixed

    monkeypatch.setattr(backend, "_unserved_logged", set())
    monkeypatch.setattr(grouping, "_logged", set())
    monkeypatch.setattr(peft_patch, "_fallbacks_logged", set())
    monkeypatch.setattr(mixed, "_logged", set())
    yield


@pytest.fixture(params=["fused", "dequant"])
def base_path(request, monkeypatch):
    """Runs a test once per base-product path, forced through FASTLORA_BASE_PATH (read at
    every call, so the backward of an autograd test sees it too). The shared dequantize buffer
    is released before and after, so no test sees another's."""
    from fastlora.launch import buffer

    buffer.release_dequant_buffer()
    monkeypatch.setenv("FASTLORA_BASE_PATH", request.param)
    yield request.param
    buffer.release_dequant_buffer()
