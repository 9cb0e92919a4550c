"""The base product's second path, and the per-shape choice between the two (issue 16).

The base product is y = x @ deq(W)^T in the forward and dx += dy @ deq(W) in the backward.

    fused    fastlora's fused GEMMs read W packed (launch/forward.py: the tiled kernel, or the
             split-K small-M kernel for M <= 16; launch/backward.py: the dx kernel)
    dequant  fastlora's dequantize kernel writes W into the one shared buffer
             (launch/buffer.py), then cuBLAS: y = addmm(bias, x, W^T) and y += s U B^T
             (addmm, alpha = s; U from the U kernel as on the fused path); dx (holding the da
             kernel's LoRA term) += dy @ W (addmm_)

Both round the base product once from an fp32 accumulation; the dequantize path adds the LoRA
term in a second rounding (as plain PyTorch does), inside the same 2 x baseline + 1 ulp bound.

The choice (`run`), per role ('forward', 'dx') and key (GPU name, dtype, N, K, M bucket of
csrc_triton.common.m_bucket, and the fused kernel that serves the call, `kernel`: 'gemv' for
the forward at M <= 2 without dropout, 'small_m' at M <= 16, 'tiled' above, or 'one_pass'
for a forward above M = 16 that the one-pass kernel can serve (16-bit, no dropout, K on the
blocksize, r <= 64: launch/forward.py one_pass_ready); a pick timed for one fused kernel never
serves another):
  1. an explicit fused config / fused sub-path at the launcher pins the fused path;
  2. a shape whose buffer would pass the cap (FASTLORA_DEQUANT_BUFFER_MB) takes the fused path;
  3. `base=` at the launcher, else set_base_path(), else FASTLORA_BASE_PATH = auto | fused |
     dequant forces a path;
  4. auto: on a CUDA device, the first call of a key runs each path once (the fused path's
     autotuning happens there), times both (triton.testing.do_bench, median) and keeps the
     faster for the process (one thread times, the others wait; picks are per process, never
     written to disk). On the CPU / in the interpreter the fused path runs (tests force either
     path). While a CUDA graph is being captured with no pick yet, nothing is timed: the path
     the model expects to be faster runs (`modelled_pick`: the GPU table's row of the device
     and the break-even M modelled for the nearest of fastlora.bench.picks' shapes, read from
     fastlora/data/modelled_picks.json; on a B200, dequantize + cuBLAS from M = 512-4096).
     A 'one_pass' key times a third candidate (`choose`'s others): U and y in one launch of
     the one-pass forward (issue 30 part 4), against 'fused' (the U kernel, then the tiled
     GEMM) and 'dequant' (the U kernel, then dequantize + cuBLAS); its pick may be
     'one_pass'. fastlora.bench.model.one_pass_pays says where the model expects it to win
     (narrow layers, short launches).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
from typing import Callable, Iterator, Mapping, Optional

import torch

from .. import backend, gpus
from . import buffer

__all__ = ["run", "choose", "settled", "settings", "requested", "set_base_path", "forced",
           "picks", "timings", "pick_for", "clear_picks", "forward_dequant", "dx_dequant",
           "modelled_pick", "PATHS", "ROLES"]

PATHS = ("auto", "fused", "dequant")
ROLES = ("forward", "dx")
SMALL_M_MAX = 16  # launch/forward.py SMALL_M_MAX (a test keeps them equal)
GEMV_MAX_M = 2    # csrc_triton/gemv.py GEMV_MAX_M (a test keeps them equal)
KERNELS = ("gemv", "small_m", "tiled", "one_pass")
_ENV = "FASTLORA_BASE_PATH"
# timing of one candidate (do_bench, ms): short, it runs once per key and process
WARMUP_MS, REP_MS = 5, 25
# the model's picks per GPU (written by fastlora.bench.picks; tests/test_modelled_picks.py
# keeps it equal to what the model computes from the committed compile record)
MODELLED_PICKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "data", "modelled_picks.json")

_override: Optional[str] = None
_PICKS: dict = {}      # key -> "fused" | "dequant"
_TIMINGS: dict = {}    # key -> {"fused": ms, "dequant": ms}
_GENERATION = [0]     # bumped whenever _PICKS changes (prepared launches re-check then)
_LOCK = threading.Lock()
_NAMES: dict = {}      # str(device) -> GPU name


# ----------------------------------------------------------------------------- the second path

def forward_dequant(x, packed, state, u, lora_b, scaling: float, bias, out) -> None:
    """out [M, N] = x @ deq(W)^T + bias + s * u @ lora_b^T, W from the shared buffer; the
    bias rides in cuBLAS's epilogue (fp32, before the one rounding of the base product)."""
    with torch.no_grad(), buffer.weight(packed, state, x.dtype) as w:
        if bias is not None:
            torch.addmm(bias, x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
        out.addmm_(u, lora_b.t(), alpha=scaling)


def dx_dequant(dy, packed, state, dx) -> None:
    """dx [M, K] += dy @ deq(W) (dx holds the LoRA term on entry), W from the shared buffer."""
    with torch.no_grad(), buffer.weight(packed, state, dy.dtype) as w:
        if dx.is_cuda:
            dx.addmm_(dy, w)  # cuBLAS beta = 1: the LoRA term joins the fp32 accumulation
        else:
            # torch's CPU addmm onto a non-zero input strays (measured with torch 2.13: 6 fp32
            # ulps at M = 1, 3x plain PyTorch's error): the product, then one add
            dx.add_(torch.mm(dy, w))


# ----------------------------------------------------------------------------- the setting

def _check(value, what: str) -> str:
    text = str(value).strip().lower() if value is not None else "auto"
    if text not in PATHS:
        raise ValueError(f"{what} must be one of {PATHS}, got {value!r}")
    return text


def requested(base: Optional[str] = None) -> str:
    """The asked-for path: `base` (a launcher's argument) unless None or 'auto', else
    set_base_path()'s value, else FASTLORA_BASE_PATH (read at every call), else 'auto'."""
    if base is not None and _check(base, "base") != "auto":
        return _check(base, "base")
    if _override is not None:
        return _override
    return _check(os.environ.get(_ENV, "auto") or "auto", _ENV)


def set_base_path(value: Optional[str]) -> None:
    """Force 'fused' or 'dequant' (or 'auto') for the process, over FASTLORA_BASE_PATH;
    None: back to the environment variable."""
    global _override
    _override = None if value is None else _check(value, "base path")


@contextlib.contextmanager
def forced(value: Optional[str]) -> Iterator[None]:
    """set_base_path(value) inside the block (None: change nothing), restored after; both the
    forward and a backward run inside it see it (the benchmark times each path this way)."""
    global _override
    if value is None:
        yield
        return
    saved = _override
    set_base_path(value)
    try:
        yield
    finally:
        _override = saved


# ----------------------------------------------------------------------------- the choice

def _gpu_name(device: torch.device) -> str:
    name = _NAMES.get(str(device))
    if name is None:
        name = _NAMES[str(device)] = (torch.cuda.get_device_name(device)
                                      if device.type == "cuda" else device.type)
    return name


def default_kernel(role: str, m: int) -> str:
    """The fused kernel an unforced call of M rows takes: 'gemv' (forward, M <= GEMV_MAX_M),
    'small_m' (M <= SMALL_M_MAX) or 'tiled'. A forward at M <= 2 with dropout, or with K
    not block-aligned, runs 'small_m' and says so (the `kernel` argument of choose)."""
    if role == "forward" and m <= GEMV_MAX_M:
        return "gemv"
    return "small_m" if m <= SMALL_M_MAX else "tiled"


def key(role: str, device: torch.device, dtype: torch.dtype, n: int, k: int, m: int,
        kernel: Optional[str] = None) -> tuple:
    """The dispatcher's cache key of one call; kernel: the fused kernel that serves it
    (default_kernel's answer when None)."""
    from csrc_triton.common import m_bucket

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    kernel = default_kernel(role, m) if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return (_gpu_name(device), str(dtype).replace("torch.", ""), int(n), int(k), m_bucket(m),
            kernel, role)


@functools.lru_cache(maxsize=None)
def _modelled_table() -> dict:
    with open(MODELLED_PICKS, encoding="utf-8") as f:
        return json.load(f)


def _table_gpu(device: torch.device) -> Optional[str]:
    """The GPU table's row that models `device`: its own (by name), else its compute
    capability's reference GPU; None off CUDA or below sm_80."""
    if device.type != "cuda":
        return None
    found = gpus.gpu_for_device(_gpu_name(device))
    if found is None:
        try:
            found = gpus.reference(gpus.capability_arch(
                *torch.cuda.get_device_capability(device)))
        except (KeyError, ValueError):
            return None
    return found.name


def modelled_pick(role: str, device: torch.device, dtype: torch.dtype, *, n: int, k: int,
                  m: int) -> str:
    """'fused' or 'dequant': the path the model expects to be faster for this call (modelled,
    not measured; fastlora.bench.picks): 'dequant' where M reaches the break-even modelled
    for the device's GPU, dtype class and role at the nearest of the table's (N, K) shapes
    (nearest in log N + log K). 'fused' off CUDA and for a GPU the table cannot place."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    table = _modelled_table()
    entry = table["gpus"].get(_table_gpu(device) or "")
    if entry is None:
        return "fused"
    klass = "16bit" if dtype in (torch.bfloat16, torch.float16) else "fp32"
    shapes = table["shapes"]
    nearest = min(range(len(shapes)), key=lambda i: abs(math.log2(n / shapes[i][0]))
                  + abs(math.log2(k / shapes[i][1])))
    start = entry[klass][role][nearest]
    return "dequant" if start is not None and m >= start else "fused"


def _time_ms(fn: Callable[[], None]) -> float:
    """Median ms of fn() (do_bench: CUDA events, L2 flushed between calls). Tests mock it."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def _can_time(device: torch.device) -> bool:
    """Whether auto times the paths here: compiled kernels on a CUDA device (not the CPU, not
    the interpreter, whose times say nothing about a GPU)."""
    return device.type == "cuda" and not backend.interpreter_active()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(role: str, out: torch.Tensor, fused: Callable, dequant: Callable, *, n: int, k: int,
           m: int, base: Optional[str] = None, pinned: bool = False,
           accumulates: bool = False, kernel: Optional[str] = None,
           others: Optional[Mapping[str, Callable]] = None) -> str:
    """'fused' or 'dequant' for this call (module doc). fused(t) / dequant(t) compute the base
    product (and what the launcher fuses around it) into t, shaped like `out`; when timing,
    they run on `out` itself, or on a zeroed scratch copy when they accumulate into it;
    kernel: the fused kernel `fused` runs (key). others: more fused candidates by name (the
    one-pass forward), timed with the two where auto times, and picked by name when fastest;
    everywhere else (pinned, forced, off a GPU, in a capture) the answer is one of the two."""
    if base is not None and _check(base, "base") == "dequant" and pinned:
        raise ValueError("base='dequant' cannot run with an explicit fused config or path")
    if pinned or not buffer.fits(n, k, out.dtype):
        return "fused"
    want = requested(base)
    if want != "auto":
        return want
    device = out.device
    if not _can_time(device):
        return "fused"
    the_key = key(role, device, out.dtype, n, k, m, kernel)
    pick = _PICKS.get(the_key)
    if pick is not None:
        return pick
    if _capturing(device):
        # no timing inside a graph capture: the model's pick; the timed one comes on an eager call
        return modelled_pick(role, device, out.dtype, n=n, k=k, m=m)
    with _LOCK:
        pick = _PICKS.get(the_key)
        if pick is None:
            target = torch.zeros_like(out) if accumulates else out
            candidates = {"fused": fused, "dequant": dequant, **(others or {})}
            for fn in candidates.values():  # compile, autotune, allocate the buffer
                fn(target)
            times = {name: _time_ms(lambda fn=fn: fn(target))
                     for name, fn in candidates.items()}
            pick = min(times, key=times.get)
            _TIMINGS[the_key] = times
            _PICKS[the_key] = pick
            _GENERATION[0] += 1
    return pick


def settled(role: str, device: torch.device, dtype: torch.dtype, *, n: int, k: int, m: int,
            base: Optional[str] = None, kernel: Optional[str] = None) -> Optional[str]:
    """The path an unpinned call of this shape takes now without timing anything ('fused' or
    'dequant', as choose decides it; `base` and `kernel` as choose's), or None while auto has not picked
    this key yet. A launch prepared on its answer (launch/forward.py prepare_small_m) stays
    right while settings() is what it was."""
    if not buffer.fits(n, k, dtype):
        return "fused"
    want = requested(base)
    if want != "auto":
        return want
    if not _can_time(device):
        return "fused"
    return _PICKS.get(key(role, device, dtype, n, k, m, kernel))


def settings() -> tuple:
    """What settled() depends on besides its arguments: the requested path, the buffer cap
    (both read from the environment now) and a number that changes whenever a pick is made
    or the picks are cleared."""
    return requested(), buffer.cap_bytes(), _GENERATION[0]


def run(role: str, out: torch.Tensor, fused: Callable, dequant: Callable, **kwargs) -> str:
    """choose(...), then run the chosen path on `out`; returns its name."""
    pick = choose(role, out, fused, dequant, **kwargs)
    {"fused": fused, "dequant": dequant, **(kwargs.get("others") or {})}[pick](out)
    return pick


# ----------------------------------------------------------------------------- what was picked

def picks() -> dict:
    """{key: 'fused' | 'dequant' | 'one_pass'} of this process (a copy)."""
    with _LOCK:
        return dict(_PICKS)


def timings() -> dict:
    """{key: {'fused': ms, 'dequant': ms, ...}} measured for each pick (a copy)."""
    with _LOCK:
        return {k: dict(v) for k, v in _TIMINGS.items()}


def pick_for(role: str, device, dtype: torch.dtype, n: int, k: int, m: int,
             kernel: Optional[str] = None) -> Optional[str]:
    """The kept pick of one key, None when it was not timed (yet)."""
    return _PICKS.get(key(role, torch.device(device), dtype, n, k, m, kernel))


def clear_picks() -> None:
    """Forget every pick (they are timed again on the next calls)."""
    with _LOCK:
        _PICKS.clear()
        _TIMINGS.clear()
        _GENERATION[0] += 1
