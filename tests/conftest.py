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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda(why): needs a CUDA GPU with compiled kernels (skipped otherwise); "
        "benchmarks/gpu_check.sh runs `pytest -m cuda`")


def pytest_collection_modifyitems(config, items):
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
