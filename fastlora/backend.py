"""Which implementation runs: the Triton kernels or the PyTorch reference (DESIGN.md).

FASTLORA_BACKEND = auto | triton | reference, read at every call.
  auto       Triton on CUDA tensors of a GPU the kernels serve (NVIDIA, compute capability
             8.0 or newer: gpu_problem), and on CPU tensors when TRITON_INTERPRET=1 (the
             kernels then run in Triton's interpreter); the reference path otherwise (on an
             older or non-NVIDIA GPU, with a warning logged once per device).
  triton     always the kernels; CPU tensors without the interpreter, and a GPU the kernels
             do not serve, are an error.
  reference  always the PyTorch reference path.
Nothing here touches a device at import time.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("fastlora")

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


MIN_CAPABILITY = (8, 0)  # bf16 tensor cores, cp.async; fastlora.gpus has no older target
_unserved_logged: set = set()


@functools.lru_cache(maxsize=None)
def _gpu_problem(index: int) -> Optional[str]:
    if torch.version.hip is not None:
        return "a ROCm GPU: the kernels decode 4-bit weights with inline NVIDIA PTX"
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(index)} is compute capability {major}.{minor}: "
                f"the kernels need NVIDIA {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                "(A100, A10, RTX 30xx and later; no config is compiled or checked for older "
                "GPUs such as the T4 or V100)")
    return None


def gpu_problem(device: torch.device) -> Optional[str]:
    """Why the kernels do not serve CUDA device `device` (None: they do), read once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_problem(index)


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
    if runnable and tensor.is_cuda:
        problem = gpu_problem(tensor.device)
        if problem is not None:
            if choice == "triton":
                raise RuntimeError(f"FASTLORA_BACKEND=triton, but {problem}. Use "
                                   "FASTLORA_BACKEND=auto or reference.")
            if problem not in _unserved_logged:
                _unserved_logged.add(problem)
                logger.warning("fastlora: %s; running the PyTorch reference path (correct, "
                               "not fast); logged once", problem)
            return False
    return runnable


def describe(device: torch.device | str = "cpu") -> str:
    """One line saying which backend runs for tensors on `device` (for the CLI)."""
    device = torch.device(device)
    if device.type == "cuda":
        problem = gpu_problem(device) if requested() != "reference" else None
        runs = "triton (compiled kernels)" if requested() != "reference" and triton_available() \
            and problem is None else "reference (PyTorch)"
        if problem is not None:
            runs += f": {problem}"
    elif requested() != "reference" and interpreter_active():
        runs = "triton (kernels in the Triton CPU interpreter)"
    else:
        runs = "reference (PyTorch)"
    return f"FASTLORA_BACKEND={requested()}, device={device}: {runs}"
