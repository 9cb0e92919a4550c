"""Shared launcher plumbing: QuantState -> kernel arguments, interpreter setup, device facts,
the autotuner cache."""

from __future__ import annotations

import functools
import threading

import torch

from .. import backend, interpreter
from ..quant import QuantState, code_table, packed_bytes


_INTERPRETER_LOCK = threading.RLock()


def kernel_entry(launcher):
    """Decorator of every launcher: installs the interpreter correction when it applies and,
    while kernels run in Triton's CPU interpreter, runs one launcher at a time. The interpreter
    rebinds triton.language functions while it runs a kernel, so two threads interpreting at
    once break each other (measured: "... must be provided outside of JIT functions").
    Compiled GPU launches are unaffected."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        if not backend.interpreter_active():
            return launcher(*args, **kwargs)
        interpreter.apply()
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    return guarded


def weight_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr) for a kernel, in
    the order csrc_triton/common.py documents; unused double-quant pointers repeat absmax."""
    raw = packed_bytes(packed)
    code = code_table(state.quant_type, packed.device)  # the decoders' table (FP4 zero is -0.0)
    if state.nested:
        offset = state.offset.reshape(1).to(torch.float32)
        return (raw, state.absmax, state.state2.absmax, state.state2.code, offset, code)
    return (raw, state.absmax, state.absmax, state.absmax, state.absmax, code)


# Kernel launch options shared by every weight-reading kernel: see csrc_triton/common.py on FMA.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 activations follow torch.backends.cuda.matmul.allow_tf32
    (tf32 when torch would use it, full fp32 'ieee' otherwise); 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def arch(device: torch.device) -> str:
    """'sm_90' on compute capability 9.x (wgmma), else 'sm_80' (mma.sync configs)."""
    return "sm_90" if torch.cuda.get_device_capability(device)[0] == 9 else "sm_80"


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_TUNERS: dict = {}
_TUNERS_LOCK = threading.Lock()


def cached_autotuner(key: tuple, build):
    """The triton.autotune launcher for `key`, built by `build()` once per process even when
    threads race to the first call (GPU only; the interpreter runs fixed configs)."""
    with _TUNERS_LOCK:
        tuner = _TUNERS.get(key)
        if tuner is None:
            tuner = _TUNERS[key] = build()
    return tuner
