"""Which implementation runs: the Triton kernels or the PyTorch reference (DESIGN.md).

FASTLORA_BACKEND = auto | triton | reference, read at every call.
  auto       Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (the kernels
             then run in Triton's interpreter); the reference path otherwise.
  triton     always the kernels; CPU tensors without the interpreter are an error.
  reference  always the PyTorch reference path.
Nothing here touches a device at import time.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def requested() -> str:
    value = os.environ.get("FASTLORA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTLORA_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton decides this when a kernel is decorated, so set the variable before importing
    fastlora's kernels (csrc_triton), as DESIGN.md asks."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401 (only checks that it imports)
    except ImportError:  # pragma: no cover - triton is a dependency
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the op on `tensor` runs the Triton kernels (True) or the reference (False)."""
    choice = requested()
    if choice == "reference":
        return False
    runnable = triton_available() and (tensor.is_cuda or
                                      (tensor.device.type == "cpu" and interpreter_active()))
    if choice == "triton" and not runnable:
        raise RuntimeError(
            f"FASTLORA_BACKEND=triton but the tensors are on {tensor.device} and "
            "TRITON_INTERPRET is not set: Triton kernels need a CUDA device or the interpreter "
            "(TRITON_INTERPRET=1 before import). Use FASTLORA_BACKEND=auto or reference.")
    return runnable


def describe(device: torch.device | str = "cpu") -> str:
    """One line saying which backend runs for tensors on `device` (for the CLI)."""
    device = torch.device(device)
    if device.type == "cuda":
        runs = "triton (compiled kernels)" if requested() != "reference" and triton_available() \
            else "reference (PyTorch)"
    elif requested() != "reference" and interpreter_active():
        runs = "triton (kernels in the Triton CPU interpreter)"
    else:
        runs = "reference (PyTorch)"
    return f"FASTLORA_BACKEND={requested()}, device={device}: {runs}"
