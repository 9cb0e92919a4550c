"""The first-launch self-check of the kernels' 4-bit decode on a GPU (issue 10, item 4).

On a GPU the kernels read the NF4/FP4 code table through inline PTX (csrc_triton/common.py
`lane_table` / `code_lookup`), which the CPU interpreter never runs. So before the kernels
serve a (device, quant_type) for the first time in a process, `decode_ok` decodes one small
weight through every kernel path that decodes and compares the results bit for bit with the
PyTorch decoder (fastlora.quant.dequantize_4bit_torch):

  (a) the dequant kernel (launch.dequant.dequantize_4bit_triton);
  (b) the tiled fused forward with x = I_K and lora_B = 0: y = deq(W)^T exactly (each output is
      one product with 1.0 plus exact zeros, rounded once, as the decoder rounds once);
  (c) the small-M forward with x = 16 rows of I_K, spread over all of K (every quantisation
      block, both nibbles of a byte, two split-K slices): y = deq(W)[:, cols]^T exactly;
  (d) the one-pass forward (U and y in one launch) as (b);
  (e) the M <= 2 CUDA-core forward, the columns of (c) two at a time.

On a GPU (b)-(e) run one explicit config each, the first of the arch's autotune list (the
decode is the same code in every config), so the check compiles one kernel per path rather
than autotuning for its own shapes; the interpreter runs its fixed configs.

W is [64, 128] in bf16, double-quantised at blocksize 64, so K % 64 == 0 and the K-aligned
word path of the decoder runs. On a mismatch or an exception the answer is False, one
RuntimeWarning names the device and quant type, and the dispatch (`use_kernels`, called by
fastlora.lora_linear_4bit and fastlora.dequantize_4bit) sends that device's calls to the PyTorch
reference path. The result is cached per (device, quant_type) for the process, computed once
even when threads race (a lock). The check calls the launchers directly, below the dispatch, so
it never re-enters itself. Nothing here touches a device at import time.

Under the interpreter or on a CPU there is no PTX to check and `decode_ok` returns True without
work, unless forced (`force=True`, or the module flag FORCE, which tests set).
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch

from .. import backend
from ..quant import dequantize_4bit_torch, quantize_4bit

__all__ = ["decode_ok", "use_kernels", "FORCE"]

FORCE = False  # run the check on CPU / interpreter too (tests)

N, K = 64, 128            # the check's weight W [N, K]: K % BLOCKSIZE == 0 (word path)
BLOCKSIZE = 64
RANK = 8
# x rows of the small-M check: 16 columns of I_K, 0, 9, 16, 25, ..., 121: every quantisation
# block, high and low nibbles, every K slice
SMALL_M_COLUMNS = tuple(i * (K // 16) + i % 2 for i in range(16))
DTYPE = torch.bfloat16

_RESULTS: dict = {}       # (str(device), quant_type) -> bool
_LOCK = threading.Lock()


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def decode_ok(device, quant_type: str, force: Optional[bool] = None) -> bool:
    """Whether the kernels decode `quant_type` weights right on `device` (see the module doc).

    True without work off CUDA or under the interpreter unless `force` (default: FORCE)."""
    force = FORCE if force is None else force
    device = _device(device)
    if not force and (device.type != "cuda" or backend.interpreter_active()):
        return True
    key = (str(device), quant_type)
    with _LOCK:
        ok = _RESULTS.get(key)
        if ok is None:
            problem = _check(device, quant_type)
            ok = _RESULTS[key] = problem is None
            if problem is not None:
                warnings.warn(
                    f"fastlora: the 4-bit decode self-check failed on {_device_name(device)} "
                    f"({device}) for quant_type {quant_type!r}: {problem}. fastlora falls back "
                    f"to the PyTorch reference path for {quant_type} weights on this device "
                    "(correct, slower).", RuntimeWarning, stacklevel=2)
    return ok


# torch.compile: dynamo calls decode_ok eagerly while tracing and keeps its answer as a constant
# (no graph break, fullgraph works), which is what torch.compiler.assume_constant_result does:
# it sets this attribute, but imports torch._dynamo (and triton) to do so, at fastlora's import
# time. tests/test_selfcheck.py checks that the decorator still sets exactly this.
decode_ok._dynamo_marked_constant = True


def use_kernels(tensor: torch.Tensor, quant_type: str) -> bool:
    """The dispatch: backend.use_triton(tensor), and under FASTLORA_BACKEND=auto only while
    decode_ok(tensor.device, quant_type). FASTLORA_BACKEND=triton always runs the kernels (what
    `fastlora verify` and the benchmarks measure)."""
    if not backend.use_triton(tensor):
        return False
    return backend.requested() == "triton" or decode_ok(tensor.device, quant_type)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # pragma: no cover - the name is only for the message
            pass
    return device.type.upper()


def _mismatch(what: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"{what} returned {tuple(got.shape)} {got.dtype}, expected "
                f"{tuple(want.shape)} {want.dtype}")
    if torch.equal(got, want):  # the weight has no NaN; -0.0 == 0.0 (FP4's zero sign)
        return None
    bad = got != want
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{what} differs from the PyTorch decoder at {int(bad.sum())} of {want.numel()} "
            f"values (first at {first})")


def _configs(device: torch.device) -> tuple[Optional[dict], ...]:
    """(tiled, small_m, gemv, one_pass) configs of the check's forward launches: None (the
    fixed ones) in the interpreter; on a GPU the first bf16, K-aligned config of each autotune list, as the
    device's compile target has it (sm_86, sm_89, sm_100 and sm_120: sm_80's with their fixes)."""
    if backend.interpreter_active():
        return None, None, None, None
    from csrc_triton import forward as fwd_kernels, gemv as gemv_kernels
    from csrc_triton import small_m as small_m_kernels
    from .common import arch, compile_arch

    tiled = dict(fwd_kernels.tiled_configs(compile_arch(device), False, True)[0])
    small = small_m_kernels.small_m_configs(False, True, "tf32", compile_arch(device))[0]
    return (tiled, {**small, "SPLIT_K": 2},
            {**gemv_kernels.gemv_configs(2, 16, False, compile_arch(device))[0], "SPLIT_K": 2},
            dict(fwd_kernels.one_pass_configs(arch(device))[0]))


def _check(device: torch.device, quant_type: str) -> Optional[str]:
    """None when every decoding kernel path matches the PyTorch decoder, else what differed."""
    try:
        from . import dequant, forward  # the launchers; imported here: they pull in triton

        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=g).to(device=device, dtype=DTYPE)
        packed, state = quantize_4bit(w, quant_type, blocksize=BLOCKSIZE, double_quant=True)
        want = dequantize_4bit_torch(packed, state, DTYPE)  # [N, K]

        problem = _mismatch("the dequant kernel",
                            dequant.dequantize_4bit_triton(packed, state, DTYPE), want)
        if problem:
            return problem
        tiled, small, gemv, one_pass = _configs(device)
        eye = torch.eye(K, dtype=DTYPE, device=device)
        lora_a = torch.zeros(RANK, K, dtype=DTYPE, device=device)
        lora_b = torch.zeros(N, RANK, dtype=DTYPE, device=device)
        y, _ = forward.lora_forward(eye, packed, state, lora_a, lora_b, 1.0, None, 0.0, 0,
                                    config=tiled, path="tiled")
        problem = _mismatch("the tiled forward", y, want.t())
        if problem:
            return problem
        y, _ = forward.lora_forward(eye, packed, state, lora_a, lora_b, 1.0, None, 0.0, 0,
                                    config=one_pass, path="one_pass")
        problem = _mismatch("the one-pass forward", y, want.t())
        if problem:
            return problem
        cols = torch.tensor(SMALL_M_COLUMNS, device=device)
        y, _ = forward.lora_forward(eye[cols], packed, state, lora_a, lora_b, 1.0, None, 0.0,
                                    0, config=small, path="small_m")
        problem = _mismatch("the small-M forward", y, want[:, cols].t())
        if problem:
            return problem
        # the CUDA-core decode at M <= 2 (csrc_triton/gemv.py): the same 16 columns two at a
        # time; a one-hot row's sums are exact, so each picks its column of W bit for bit
        for pair in cols.view(-1, 2):
            y, _ = forward.lora_forward(eye[pair], packed, state, lora_a, lora_b, 1.0, None,
                                        0.0, 0, config=gemv, path="gemv")
            problem = _mismatch("the M <= 2 (CUDA-core) forward", y, want[:, pair].t())
            if problem:
                return problem
        return None
    except Exception as exc:  # a kernel that cannot run here is a failed check, not a crash
        return f"the check raised {type(exc).__name__}: {exc}"
