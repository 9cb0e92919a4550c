"""Test setup: kernels run in Triton's CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported (DESIGN.md), hence at the very top.
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
