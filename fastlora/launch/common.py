"""Shared launcher plumbing: QuantState -> kernel arguments, interpreter setup, device facts,
the autotuner cache."""

from __future__ import annotations

import functools
import logging
import threading

import torch

from .. import backend, interpreter
from ..checks import DeviceSeed, seed_high, seed_tensor
from ..gpus import CONFIG_FAMILY, capability_arch
from ..quant import QuantState, code_table, packed_bytes

logger = logging.getLogger("fastlora")


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


def prepared_entry(launch):
    """kernel_entry for a launch prepared now (launch/forward.py prepare_small_m): whether the
    interpreter runs it, and its correction, are settled here once, not at every call."""
    if not backend.interpreter_active():
        return launch
    interpreter.apply()

    def guarded(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return launch(*args, **kwargs)
    return guarded


def weight_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr) for a kernel, in
    the order csrc_triton/common.py documents; unused double-quant pointers repeat absmax.
    The kernels index these flat, so a strided view (never what bitsandbytes makes) is copied:
    at most N*K/32 bytes of absmax, against the N*K/2 of the packed weight."""
    raw = packed_bytes(packed)
    code = code_table(state.quant_type, packed.device)  # the decoders' table (FP4 zero is -0.0)
    absmax = state.absmax.contiguous()
    if state.nested:
        offset = state.offset.reshape(1).to(torch.float32)
        return (raw, absmax, state.state2.absmax.contiguous(), state.state2.code.contiguous(),
                offset, code)
    return (raw, absmax, absmax, absmax, absmax, code)


def lane_table() -> bool:
    """The decoders' LANE_TABLE constexpr: the code table in registers, read by warp shuffle
    (inline PTX), on compiled GPU kernels; the interpreter, which runs no PTX, gathers the same
    values from the table in memory."""
    return not backend.interpreter_active()


def words_aligned(packed: torch.Tensor) -> bool:
    """Whether the packed bytes start on a 32-bit word: the decoders then read int32 words."""
    return packed.data_ptr() % 4 == 0


def decode_flags(packed: torch.Tensor, state: QuantState, k: int) -> dict:
    """The weight decoder's constexprs (csrc_triton/common.py decode_tile), the same for every
    weight-reading kernel:
    K_ALIGNED  rows start on a quantisation block (K % blocksize == 0) and on a 32-bit word of
               packed bytes (the tile is read as int32 words); otherwise the per-element path;
    LANE_TABLE lane_table()."""
    return {"QBLOCK": state.blocksize, "DOUBLE_QUANT": state.nested,
            "K_ALIGNED": k % state.blocksize == 0 and words_aligned(packed),
            "LANE_TABLE": lane_table()}


_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros for a launch whose programs reduce their partials in-kernel
    (csrc_triton/common.py last_to_arrive: the last program of each tile resets its counter).

    On CUDA one buffer per (device, stream) is kept and handed to every such launch, with no
    clearing launch in between: a launch leaves all its counters at zero, and launches on one
    stream run one after another. Another stream gets its own buffer, so concurrent launches
    never share a counter. The buffer grows (a fresh zeroed one) when a launch needs more.
    In the interpreter (CPU tensors) a fresh zeroed tensor per launch."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).stream_id)
    with _COUNTERS_LOCK:
        buffer = _COUNTERS.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32,
                                                  device=device)
    return buffer[:n]


def seed_args(seed, p: float, device: torch.device) -> tuple:
    """The dropout seed as the kernels take it (csrc_triton/common.py dropout_seed): an int64
    [1] tensor on `device` whose low word they read there (so a captured CUDA graph replays
    whatever the draw before it wrote) and the seed's high word. `seed`: a
    fastlora.checks.DeviceSeed (the ops' own: passed as it is) or an int (a launcher called
    directly: put on the device, one small fill). Without dropout (p == 0) the kernels read
    neither: a placeholder, no launch."""
    if isinstance(seed, DeviceSeed):
        return seed.tensor.to(device).reshape(1), int(seed.high)
    return seed_tensor(int(seed), p, device), seed_high(int(seed))


# Kernel launch options shared by every weight-reading kernel: see csrc_triton/common.py on FMA.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def torch_matmul_uses_tf32() -> bool:
    """Whether torch's own fp32 matmuls on CUDA run as tf32. torch >= 2.9 has
    `matmul.fp32_precision` ('tf32', 'ieee', or 'none' = inherit; the getter resolves the
    inheritance and reflects the legacy flag too), and reading the legacy `allow_tf32` raises
    once a user has set the new API: read the new one where it exists."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 activations follow torch's fp32 matmul setting (tf32 when
    torch would use it, full fp32 'ieee' otherwise); 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch_matmul_uses_tf32():
        return "ieee"
    return "tf32"


def compile_arch(device: torch.device) -> str:
    """The device's compile target in the GPU table ('sm_80', 'sm_86', 'sm_89', 'sm_90',
    'sm_100', 'sm_120': fastlora.gpus.capability_arch). A GPU older than 8.0 (T4, V100: no
    target of its own, nothing compiled or checked for it) gets sm_80's, as before there were
    per-arch targets."""
    major, minor = torch.cuda.get_device_capability(device)
    return capability_arch(major, minor) if major >= 8 else "sm_80"


def config_target(device: torch.device) -> str:
    """The compile target whose fixed configs (csrc_triton's u_config, da_config) a launch on
    `device` takes: compile_arch on a GPU; 'sm_80' (whose configs the interpreter runs too)
    elsewhere."""
    return compile_arch(device) if device.type == "cuda" else "sm_80"


def arch(device: torch.device) -> str:
    """The config family the device runs: 'sm_90' on compute capability 9.x (wgmma), else
    'sm_80' (the mma.sync lists; fastlora.gpus.CONFIG_FAMILY)."""
    return CONFIG_FAMILY[compile_arch(device)]


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class LockedTuner:
    """A triton.autotune launcher that one thread runs at a time. Triton's Autotuner keeps the
    call's arguments on the shared instance (`self.nargs`, set at the start of `run`, read while
    configs are timed and pruned, reset to None at the end), so two threads in `run` at once
    can read each other's arguments or None. Holding the lock costs one uncontended acquire per
    launch (launches are asynchronous); a thread that arrives while configs are being timed
    waits for the pick instead of timing them again.

    Inside CUDA graph capture nothing may be timed (Triton's benchmark synchronises): a call
    whose shape the Autotuner has not picked for yet launches the list's default config and
    says so once per kernel (a later eager call still autotunes that shape)."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.lock = threading.Lock()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self.lock:
                if capture_underway():
                    config = self._default_when_untuned(args, kwargs)
                    if config is not None:
                        return self._launch_with(grid, config, args, kwargs)
                return self.tuner[grid](*args, **kwargs)
        return launch

    def _default_when_untuned(self, args, kwargs):
        """None when Triton's Autotuner has a pick for this call (its cache key: the `key`
        arguments' values, then every tensor argument's dtype, as Autotuner.run builds it) or
        runs one config anyway; else the default config: the first of its list that its own
        pruning keeps for these arguments (issue 29: nothing is timed inside a capture)."""
        tuner = self.tuner
        if len(tuner.configs) <= 1:
            return None
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in tuner.arg_names}
        key = tuple([named[k] for k in tuner.keys if k in named]
                    + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
        if key in tuner.cache:
            return None
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            return tuner.prune_configs(kwargs)[0]
        finally:
            tuner.nargs = None

    def _launch_with(self, grid, config, args, kwargs):
        name = getattr(self.tuner.base_fn, "__name__", "a kernel")
        if name not in _capture_defaults_logged:
            _capture_defaults_logged.add(name)
            logger.warning(
                "fastlora: %s met a shape it has not autotuned inside CUDA graph capture, "
                "where nothing may be timed; it launches its default config (%s) there. Run "
                "the same shapes once before capturing to capture the tuned config; logged "
                "once per kernel", name, config)
        launch_kwargs = {**kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.tuner.arg_names, args)), **launch_kwargs})
        return self.tuner.fn[grid](*args, **launch_kwargs)


_capture_defaults_logged: set = set()


def capture_underway() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_TUNERS: dict = {}
_TUNERS_LOCK = threading.Lock()


def cached_autotuner(key: tuple, build) -> LockedTuner:
    """The triton.autotune launcher for `key` (behind its LockedTuner), built by `build()` once
    per process even when threads race to the first call (GPU only; the interpreter runs fixed
    configs)."""
    with _TUNERS_LOCK:
        tuner = _TUNERS.get(key)
        if tuner is None:
            tuner = _TUNERS[key] = LockedTuner(build())
    return tuner
