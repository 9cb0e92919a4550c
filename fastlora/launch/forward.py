"""Launcher of the fused forward: csrc_triton/forward.py (M > 16) and csrc_triton/small_m.py.

    lora_forward(x, packed, state, lora_A, lora_B, scaling, bias, p, seed, *, config, path)
        -> (y [M, N], u [M, r])

runs `U = dropout(x) @ A^T` (forward._lora_u_kernel), then `y = x @ deq(W)^T + s * U @ B^T +
bias` with the tiled kernel, or with the split-K small-M kernel when M <= SMALL_M_MAX (whose
last program per N tile sums the K slices in-kernel): two launches on either path. At
M <= GEMV_MAX_M without dropout and with K block-aligned, csrc_triton/gemv.py computes U and y
on the CUDA cores in one launch. Above SMALL_M_MAX, where the one-pass forward can serve the call
(one_pass_ready), forward._nf4_lora_fwd_one_pass_kernel makes U and y in one launch, reading x
once (issue 30, part 4): the dispatcher times it on a GPU next to U + the tiled GEMM and the
dequantize path at the first call of a shape and keeps the fastest (launch/dispatch.py; the
model, fastlora.bench.model.one_pass_pays, has it win on narrow layers and short launches only).
`config=None` picks the configuration automatically (autotuned over the pruned per-arch list on a
GPU, one fixed small config in the interpreter); an explicit dict is the debug/benchmark entry
point (keys: see TILED_KEYS / SMALL_M_KEYS).
"""

from __future__ import annotations

import torch
import triton

from ..checks import ACTIVATION_DTYPES, check_fused_rank, check_inputs, check_seed_arg
from ..reference import dropout_threshold
from .. import backend
from . import dispatch
from .common import (LAUNCH_OPTIONS, arch, arrival_counters, cached_autotuner, compile_arch,
                     config_target, decode_flags, dot_precision, kernel_entry, num_sms,
                     prepared_entry, seed_args, weight_args)

SMALL_M_MAX = 16
GEMV_MAX_M = 2  # csrc_triton/gemv.py GEMV_MAX_M (a test keeps them equal)
PATHS = ("auto", "tiled", "small_m", "gemv", "one_pass")
ONE_PASS_MAX_RANK = 64  # the one-pass forward's compiled ranks (csrc_triton/forward.py)
TILED_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "W_FIRST", "num_warps", "num_stages")
SMALL_M_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
GEMV_KEYS = SMALL_M_KEYS


def check_forward_args(x, packed, state, lora_A, lora_B, scaling, bias, p, seed) -> None:
    """fastlora.checks.check_inputs (shared with the public op), plus what the launcher adds:
    2-D x, a seed (an int, or a fastlora.checks.DeviceSeed), a rank the kernels serve."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [M, K] tensor (fold leading dims into M), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_inputs(x, packed, state, lora_A, lora_B, scaling, bias, p, True, None,
                 allowed_dtypes=ACTIVATION_DTYPES)
    check_seed_arg(seed)
    check_fused_rank(lora_A)


def choose_path(m: int, path: str = "auto", gemv_ok: bool = False,
                one_pass_ok: bool = False) -> str:
    """'gemv' for M <= GEMV_MAX_M where gemv_ok (no dropout, K block-aligned: gemv_ready),
    else 'small_m' for M <= SMALL_M_MAX, else 'tiled'; `path` forces one ('auto' decides),
    'one_pass' only where one_pass_ok (one_pass_ready). Auto never answers 'one_pass': where it
    can serve a 'tiled' call, the dispatcher times it against the two-launch path."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "one_pass" and not one_pass_ok:
        raise ValueError("path='one_pass' needs fp16/bf16 activations, no dropout, K a multiple "
                         f"of the blocksize and a rank of at most {ONE_PASS_MAX_RANK}, and the "
                         "call does not have them all")
    if path == "small_m" and m > SMALL_M_MAX:
        raise ValueError(f"path='small_m' handles at most {SMALL_M_MAX} rows, x has {m}")
    if path == "gemv" and (m > GEMV_MAX_M or not gemv_ok):
        raise ValueError(f"path='gemv' handles at most {GEMV_MAX_M} rows, no dropout and K a "
                         f"multiple of the blocksize with the packed bytes 4-byte aligned; "
                         f"x has {m} rows" + ("" if gemv_ok else ", and the rest does not hold"))
    if path != "auto":
        return path
    if m <= GEMV_MAX_M and gemv_ok:
        return "gemv"
    return "small_m" if m <= SMALL_M_MAX else "tiled"


def gemv_ready(flags: dict, p: float) -> bool:
    """Whether the one-launch CUDA-core path can serve a call (M aside): no dropout (it
    computes U itself, from x as it is) and a block-aligned K read as 32-bit words (decode_flags
    K_ALIGNED; bitsandbytes' blocksizes are all >= 32, gemv.py's tile width)."""
    return p == 0.0 and flags["K_ALIGNED"]


def one_pass_ready(flags: dict, p: float, dtype: torch.dtype, rank: int) -> bool:
    """Whether the one-pass forward can serve a call: 16-bit activations, no dropout (its U and
    its base product read the same x), K block-aligned (decode_flags K_ALIGNED) and a rank it
    was compiled for."""
    return (p == 0.0 and flags["K_ALIGNED"] and dtype in (torch.float16, torch.bfloat16)
            and rank <= ONE_PASS_MAX_RANK)


def _check_config(config: dict, keys: tuple, path: str) -> dict:
    if not isinstance(config, dict) or set(config) != set(keys):
        raise ValueError(f"config for the {path} path must be a dict with keys {keys}, "
                         f"got {config!r}")
    return config


@kernel_entry
def lora_forward(x, packed, state, lora_A, lora_B, scaling, bias, p, seed, *, config=None,
                 path="auto", base=None, check=True):
    """(y, u) of the fused forward for 2-D x [M, K] (any strides) in fp16/bf16/fp32.

    packed/state: the bnb 4-bit weight [N, K] (any quant_storage); lora_A [r, K]; lora_B [N, r];
    bias [N] or None, in x's dtype; p in [0, 1) (0: no dropout); seed: an int or a
    fastlora.checks.DeviceSeed (read on the device: launch/common.seed_args). Returns y [M, N]
    and u = dropout(x) @ A^T [M, r], both in x's dtype. `config`: None (automatic) or a dict
    of the chosen path's keys; `path`: 'auto', 'tiled' or 'small_m'. `base`: the base
    product's path, None/'auto' (launch/dispatch.py decides), 'fused' or 'dequant'; a fused
    `config` or `path` pins the fused path. `check=False`: the caller has run
    fastlora.checks.check_inputs on these arguments (the op, once per call: issue 29), so only
    the rank the kernels serve is checked here."""
    if check:
        check_forward_args(x, packed, state, lora_A, lora_B, scaling, bias, p, seed)
    else:
        check_fused_rank(lora_A)
    m, k = x.shape
    n, rank = lora_B.shape
    u = torch.empty((m, rank), dtype=x.dtype, device=x.device)
    flags = decode_flags(packed, state, k)
    gemv_ok = m <= GEMV_MAX_M and gemv_ready(flags, float(p))
    one_pass_ok = one_pass_ready(flags, float(p), x.dtype, rank)
    which = choose_path(m, path, gemv_ok, one_pass_ok)
    if m == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device), u
    if which == "gemv":
        return _forward_gemv(x, packed, state, lora_A, lora_B, scaling, bias, u, config, base,
                             config is not None or path != "auto"), u
    if which == "one_pass" or (which == "tiled" and one_pass_ok and path == "auto"
                               and config is None):
        return _forward_one_pass(x, packed, state, lora_A, lora_B, scaling, bias, u, config,
                                 base, which == "one_pass", flags), u
    _launch_u(x, lora_A, u, float(p), seed, dot_precision(x.dtype))
    return forward_with_u(x, packed, state, u, lora_B, scaling, bias, config=config,
                          path=which, base=base, pinned=config is not None or path != "auto"), u


def forward_with_u(x, packed, state, u, lora_B, scaling, bias, *, config=None, path="auto",
                   base=None, pinned=False):
    """y [M, N] = x @ deq(W)^T + s * u @ lora_B^T + bias, u = dropout(x) @ A^T given (the U
    kernel's output: lora_forward's, or the grouped op's, fastlora/launch/group.py).
    Arguments as lora_forward's, already checked; pinned: a fused config or path was asked
    for (the base product then takes the fused path)."""
    m, k = x.shape
    n, rank = lora_B.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    which = choose_path(m, path)
    # the kernels read bias[n] at bias_ptr + n: a strided view (bias[::2]) is copied, N values
    bias_arg = bias.contiguous() if bias is not None else y  # y: unread when HAS_BIAS is off
    args = (x, *weight_args(packed, state), u, lora_B, bias_arg, y)
    flags = _gemm_flags(decode_flags(packed, state, k), x, rank, bias)
    launch_fused = _launch_small_m if which == "small_m" else _launch_tiled
    dispatch.run("forward", y,
                 lambda out: launch_fused((*args[:-1], out), flags, m, n, k, rank,
                                          float(scaling), config),
                 lambda out: dispatch.forward_dequant(x, packed, state, u, lora_B,
                                                      float(scaling), bias, out),
                 n=n, k=k, m=m, base=base, pinned=pinned, kernel=which)
    return y


def _forward_gemv(x, packed, state, lora_a, lora_b, scaling, bias, u, config, base, pinned):
    """y of lora_forward at M <= GEMV_MAX_M in one launch (csrc_triton/gemv.py), u written by
    the same launch; the dispatcher's dequantize path runs the U kernel and dequantize +
    matmul instead."""
    m, k = x.shape
    n = lora_b.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch = _gemv_bound(x, packed, state, lora_a, lora_b, scaling, bias, config, store_u=True)

    def dequant(out):
        _launch_u(x, lora_a, u, 0.0, 0, dot_precision(x.dtype))
        dispatch.forward_dequant(x, packed, state, u, lora_b, float(scaling), bias, out)
    dispatch.run("forward", y, lambda out: launch(x, out, u), dequant, n=n, k=k, m=m,
                 base=base, pinned=pinned, kernel="gemv")
    return y


def _gemm_flags(decoded, x, rank, bias) -> dict:
    """The constexpr flags the tiled and one-pass forwards share: decode_flags' (`decoded`) and
    those of x's dtype, the rank and the bias."""
    return {**decoded, "HAS_BIAS": bias is not None,
            "PRECISION": dot_precision(x.dtype),
            "BLOCK_R": _forward_kernels().rank_block(rank)}


def _forward_one_pass(x, packed, state, lora_a, lora_b, scaling, bias, u, config, base, pinned,
                      decoded):
    """y of lora_forward where the one-pass forward can serve it (one_pass_ready, M > 16), u
    written too. pinned (path='one_pass'): the one-pass kernel, `config` or the autotuned list.
    Else the dispatcher picks among U + the tiled GEMM ('fused', what runs off a GPU), the
    one-pass kernel ('one_pass': timed on a GPU only) and U + dequantize + matmul. decoded:
    decode_flags(packed, state, K), as lora_forward made them."""
    m, k = x.shape
    n, rank = lora_b.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    fwd = _forward_kernels()
    flags = _gemm_flags(decoded, x, rank, bias)
    if config is None and not backend.interpreter_active():
        kernel, meta = _autotuned_one_pass(x.device), {}
    else:
        kernel = fwd._nf4_lora_fwd_one_pass_kernel
        meta = dict(_check_config(config, TILED_KEYS, "one_pass") if config is not None
                    else fwd.INTERPRETER_CONFIG)
    weight = weight_args(packed, state)
    bias_arg = bias.contiguous() if bias is not None else y  # unread without HAS_BIAS
    from csrc_triton.common import m_bucket

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

    def one_pass(out):
        kernel[grid](x, *weight, lora_a, u, lora_b, bias_arg, out, m, n, k, rank, m_bucket(m),
                     x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), u.stride(0),
                     u.stride(1), lora_b.stride(0), lora_b.stride(1), out.stride(0),
                     out.stride(1), float(scaling), **flags, **meta, **LAUNCH_OPTIONS)

    def two_launch(out):
        _launch_u(x, lora_a, u, 0.0, 0, flags["PRECISION"])
        _launch_tiled((x, *weight, u, lora_b, bias_arg, out), flags, m, n, k, rank,
                      float(scaling), None)

    def dequant(out):
        _launch_u(x, lora_a, u, 0.0, 0, flags["PRECISION"])
        dispatch.forward_dequant(x, packed, state, u, lora_b, float(scaling), bias, out)
    if pinned:
        dispatch.run("forward", y, one_pass, dequant, n=n, k=k, m=m, base=base, pinned=True,
                     kernel="one_pass")
    else:
        dispatch.run("forward", y, two_launch, dequant, n=n, k=k, m=m, base=base,
                     kernel="one_pass", others={"one_pass": one_pass})
    return y


def _gemv_bound(x, packed, state, lora_a, lora_b, scaling, bias, config, store_u):
    """_gemv_launcher for inputs shaped like x with everything but x, y and u bound: a callable
    (x2, y, u)."""
    m, k = x.shape
    n, rank = lora_b.shape
    flags = {**decode_flags(packed, state, k), "HAS_BIAS": bias is not None}
    launch = _gemv_launcher(x.device, x.dtype, flags, m, n, k, rank, float(scaling), config,
                            store_u)
    weight = weight_args(packed, state)
    bias = bias.contiguous() if bias is not None else None

    def run(x2, y, u):
        launch(x2, weight, lora_a, lora_b, bias, y, u)
    return run


def _gemv_kernels():
    from csrc_triton import gemv

    return gemv


def _gemv_launcher(device, dtype, flags, m, n, k, rank, scaling, config, store_u):
    """The one-launch M <= GEMV_MAX_M forward for m rows, configuration and split chosen: a
    callable (x, weight_args, lora_a, lora_b, bias or None, y, u) writing y (and u when
    store_u; u is unread otherwise and may be None)."""
    gv = _gemv_kernels()
    block_m, block_r = gv.block_m(m), _forward_kernels().rank_block(rank)
    if config is None and not backend.interpreter_active():
        kernel, meta = _autotuned_gemv(device, block_m, block_r, dtype == torch.float32), {}
        slices = gv.split_k(n, k, num_sms(device))
    else:
        meta = dict(_check_config(config, GEMV_KEYS, "gemv") if config is not None
                    else gv.INTERPRETER_CONFIG)
        kernel, slices = gv._nf4_lora_gemv_kernel, meta.pop("SPLIT_K")
        if meta["BLOCK_K"] != gv.BLOCK_K:
            raise ValueError(f"the gemv path's BLOCK_K is {gv.BLOCK_K} (one 16-byte load of "
                             f"packed values a row), got {meta['BLOCK_K']}")
    trips = k // gv.BLOCK_K
    k_per_split = triton.cdiv(trips, max(1, min(slices, trips))) * gv.BLOCK_K
    n_slices = triton.cdiv(k, k_per_split)
    split = n_slices > 1
    # per N tile an arrival counter and n_slices partial U's, sized for the narrowest tile
    n_tiles = triton.cdiv(n, meta.get("BLOCK_N", gv.SMALLEST_BLOCK_N))
    launch = kernel[lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), n_slices)]
    consts = {"QBLOCK": flags["QBLOCK"], "DOUBLE_QUANT": flags["DOUBLE_QUANT"],
              "HAS_BIAS": flags["HAS_BIAS"], "STORE_U": store_u, "SPLIT": split,
              "BLOCK_M": block_m, "BLOCK_R": block_r, "LANE_TABLE": flags["LANE_TABLE"],
              **meta, **gv.OPTIONS}  # FP fusion on, unlike LAUNCH_OPTIONS (gemv.py says why)
    wsu_size = n_tiles * n_slices * block_m * block_r

    def run(x, weight, lora_a, lora_b, bias, y, u):
        ws = torch.empty((n_slices, m, n), dtype=torch.float32, device=device) if split else y
        wsu = torch.empty(wsu_size, dtype=torch.float32, device=device)
        counters = arrival_counters(device, n_tiles) if split else wsu
        u_arg = u if u is not None else y  # unread without STORE_U
        launch(x, *weight, lora_a, lora_b, bias if bias is not None else y, y, u_arg, ws, wsu,
               counters, m, n, k, k // 8, rank, k_per_split, x.stride(0), x.stride(1),
               lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
               y.stride(0), y.stride(1), u_arg.stride(0), u_arg.stride(1), scaling, **consts)
    return run


def _forward_kernels():
    from csrc_triton import forward

    return forward


def _launch_u(x, lora_a, u, p, seed, precision, segments=None):
    """u := dropout(x) @ A^T; with `segments` (fastlora.launch.mixed.Segments: a mixed batch,
    lora_a its adapters' A side by side) each row keeps its own adapter's columns, times that
    adapter's scaling, and draws dropout with that adapter's p (p: whether any adapter has
    dropout)."""
    _u_launcher(lora_a, x.shape[0], x.dtype, p, seed, precision, segments)(x, u)


def _u_launcher(lora_a, m, dtype, p, seed, precision, segments=None):
    """_launch_u's launch for M = m rows of `dtype`, everything but x and u bound: a callable
    (x, u)."""
    fwd = _forward_kernels()
    k = lora_a.shape[1]
    cfg = fwd.u_config(fwd.rank_block(lora_a.shape[0]), precision, dtype == torch.float32,
                       config_target(lora_a.device))
    consts = {key: value for key, value in cfg.items() if key.startswith("BLOCK")}
    consts.update(HAS_DROPOUT=p > 0.0, DROPOUT_GROUPED=k % 8 == 0,
                  SEGMENTED=segments is not None, PRECISION=precision,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kernel = fwd._lora_u_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)]
    scalars = (*seed_args(seed, p, lora_a.device), dropout_threshold(p), 1.0 / (1.0 - p))

    def launch(x, u):
        tables = segments.u_tables() if segments is not None else (u,) * 5  # unread: off
        kernel(x, lora_a, u, m, k, lora_a.shape[0], x.stride(0), x.stride(1), lora_a.stride(0),
               lora_a.stride(1), u.stride(0), u.stride(1), *scalars, *tables, **consts)
    return launch


def _strides(x, u, lora_b, y):
    return (x.stride(0), x.stride(1), u.stride(0), u.stride(1), lora_b.stride(0),
            lora_b.stride(1), y.stride(0), y.stride(1))


def _launch_tiled(args, flags, m, n, k, rank, scaling, config):
    from csrc_triton.common import m_bucket

    fwd = _forward_kernels()
    x, u, lora_b, y = args[0], args[7], args[8], args[10]
    if config is None and not backend.interpreter_active():
        kernel, meta = _autotuned_tiled(x.device, x.dtype == torch.float32,
                                        flags["K_ALIGNED"], flags["PRECISION"]), {}
    else:
        kernel = fwd._nf4_lora_fwd_kernel
        meta = dict(_check_config(config, TILED_KEYS, "tiled") if config is not None
                    else fwd.INTERPRETER_CONFIG)

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)
    kernel[grid](*args, m, n, k, rank, m_bucket(m), *_strides(x, u, lora_b, y), scaling,
                 **flags, **meta, **LAUNCH_OPTIONS)


def _small_m_kernels():
    from csrc_triton import small_m

    return small_m


def _launch_small_m(args, flags, m, n, k, rank, scaling, config):
    _small_m_launcher(args[0].device, args[0].dtype, flags, m, n, k, rank, scaling,
                      config)(args)


def _small_m_launcher(device, dtype, flags, m, n, k, rank, scaling, config):
    """_launch_small_m's launch for M = m rows, its configuration and split chosen: a callable
    (args) taking the kernel's tensor arguments (x, weight..., u, lora_B, bias, y)."""
    sm = _small_m_kernels()
    kernel, meta, k_per_split, n_slices = small_m_plan(device, dtype, flags, m, n, k, config)
    split = n_slices > 1
    # one arrival counter per N tile, sized for the narrowest tile the autotuner may pick
    n_counters = triton.cdiv(n, meta.get("BLOCK_N", sm.SMALLEST_BLOCK_N))
    launch = kernel[lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), n_slices)]
    consts = {**flags, "SPLIT": split, "BLOCK_M": sm.BLOCK_M, **meta, **LAUNCH_OPTIONS}

    def run(args):
        x, u, lora_b, y = args[0], args[7], args[8], args[10]
        ws = torch.empty((n_slices, m, n), dtype=torch.float32, device=device) if split else y
        counters = arrival_counters(device, n_counters) if split else ws
        launch(*args, ws, counters, m, n, k, rank, k_per_split, *_strides(x, u, lora_b, y),
               scaling, **consts)
    return run


def small_m_plan(device, dtype, flags, m, n, k, config=None, group=False):
    """(kernel, meta, k_per_split, n_slices) of a split-K small-M launch over n output columns
    (a group's: its members' summed N, csrc_triton/small_m.py's group kernel when `group`):
    on a GPU the autotuned kernel (meta empty: the autotuner picks) and split_k's slicing; in
    the interpreter, or with an explicit `config` (SMALL_M_KEYS), that fixed config."""
    sm = _small_m_kernels()
    if config is None and not backend.interpreter_active():
        kernel, meta = _autotuned_small_m(device, dtype == torch.float32, flags["K_ALIGNED"],
                                          flags["PRECISION"], group), {}
        slices = sm.split_k(m, n, k, num_sms(device))
        granule = sm.SPLIT_GRANULE
    else:
        meta = dict(_check_config(config, SMALL_M_KEYS, "small_m") if config is not None
                    else sm.INTERPRETER_CONFIG)
        kernel = sm._nf4_lora_fwd_small_m_group_kernel if group \
            else sm._nf4_lora_fwd_small_m_kernel
        slices = meta.pop("SPLIT_K")
        granule = meta["BLOCK_K"]
    units = triton.cdiv(k, granule)
    k_per_split = triton.cdiv(units, max(1, min(slices, units))) * granule
    return kernel, meta, k_per_split, triton.cdiv(k, k_per_split)


def prepare_small_m(x, packed, state, lora_A, lora_B, scaling, bias):
    """lora_forward's M <= SMALL_M_MAX path without dropout for inputs shaped like x [M, K], its
    launch arguments prepared once (issue 29: host time at generation sizes): a callable
    (x2) -> y [M, N] that runs the same two launches on the same arguments as
    lora_forward(x2, ...)[0], for x2 of x's shape, dtype and device. None when a call would
    not take that path without deciding something first: M outside 1..SMALL_M_MAX, or the
    dispatcher (launch/dispatch.py) has no pick yet for this shape or picked dequantize.

    The caller has checked the arguments (fastlora.checks.check_inputs) and owns keeping the
    callable only while they stay what they were (the same tensors, unchanged): nothing is
    checked when it runs."""
    check_fused_rank(lora_A)
    m, k = x.shape
    if 0 < m <= GEMV_MAX_M and gemv_ready(decode_flags(packed, state, k), 0.0):
        return _prepare_gemv(x, packed, state, lora_A, lora_B, scaling, bias)
    y_launch = prepare_small_m_with_u(x, packed, state, lora_B, scaling, bias)
    if y_launch is None:
        return None
    u_launch = _u_launcher(lora_A, m, x.dtype, 0.0, 0, dot_precision(x.dtype))
    return prepared_u_then_y(u_launch, y_launch, x, lora_A.shape[0])


def prepared_u_then_y(u_launch, y_launch, x, rank: int):
    """The prepared call (x2) -> y of a U launch (x2, u) then a GEMM launch (x2, u) -> y, for
    inputs shaped like x [M, K]: u [M, rank] in x's dtype made at each call."""
    m, device, dtype = x.shape[0], x.device, x.dtype

    @prepared_entry
    def run(x2):
        u = torch.empty((m, rank), dtype=dtype, device=device)
        u_launch(x2, u)
        return y_launch(x2, u)
    return run


def _prepare_gemv(x, packed, state, lora_a, lora_b, scaling, bias):
    """prepare_small_m at M <= GEMV_MAX_M: one launch (csrc_triton/gemv.py) computing U and
    y, U not stored; None unless the dispatcher settled on the fused path."""
    m, k = x.shape
    n = lora_b.shape[0]
    if dispatch.settled("forward", x.device, x.dtype, n=n, k=k, m=m, kernel="gemv") != "fused":
        return None
    launch = _gemv_bound(x, packed, state, lora_a, lora_b, scaling, bias, None, store_u=False)
    device, dtype = x.device, x.dtype

    @prepared_entry
    def run(x2):
        y = torch.empty((m, n), dtype=dtype, device=device)
        launch(x2, y, None)
        return y
    return run


def prepare_small_m_with_u(x, packed, state, lora_B, scaling, bias):
    """forward_with_u's M <= SMALL_M_MAX fused path prepared once, as prepare_small_m: a
    callable (x2, u) -> y [M, N] (u: the U kernel's output), or None (prepare_small_m says
    when). Runs no interpreter guard of its own: its caller's callable holds it."""
    m, k = x.shape
    n, rank = lora_B.shape
    if not 0 < m <= SMALL_M_MAX or dispatch.settled("forward", x.device, x.dtype, n=n, k=k,
                                                     m=m, kernel="small_m") != "fused":
        return None
    flags = {**decode_flags(packed, state, k), "HAS_BIAS": bias is not None,
             "PRECISION": dot_precision(x.dtype),
             "BLOCK_R": _forward_kernels().rank_block(rank)}
    y_launch = _small_m_launcher(x.device, x.dtype, flags, m, n, k, rank, float(scaling), None)
    weight = weight_args(packed, state)
    bias = bias.contiguous() if bias is not None else None
    device, dtype = x.device, x.dtype

    def run(x2, u):
        y = torch.empty((m, n), dtype=dtype, device=device)
        y_launch((x2, *weight, u, lora_B, bias if bias is not None else y, y))
        return y
    return run


# ----------------------------------------------------------------------------- GPU autotuning
# Built on first use per (path, arch, fp32, K aligned, dot precision): nothing touches the device
# at import time. fp32 at precision "ieee" has its own lists (FMA dots: the tf32 ones spill).
_TILED_KEY = ["M_BUCKET", "N", "K", "QBLOCK", "DOUBLE_QUANT", "K_ALIGNED", "HAS_BIAS",
              "BLOCK_R", "PRECISION"]
_SMALL_M_KEY = ["N", "K", "k_per_split", "QBLOCK", "DOUBLE_QUANT", "K_ALIGNED", "HAS_BIAS",
                "BLOCK_R", "PRECISION", "SPLIT"]
_GEMV_KEY = ["N", "K", "k_per_split", "QBLOCK", "DOUBLE_QUANT", "HAS_BIAS", "STORE_U", "BLOCK_M",
             "BLOCK_R", "SPLIT"]
_SMALL_M_GROUP_KEY = ["N0", "N1", "N2", "N3", "K", "k_per_split", "QBLOCK", "DOUBLE_QUANT",
                      "K_ALIGNED", "HAS_BIAS0", "HAS_BIAS1", "HAS_BIAS2", "HAS_BIAS3",
                      "BLOCK_R", "PRECISION", "SPLIT", "G"]


def _autotuned_tiled(device: torch.device, fp32: bool, k_aligned: bool, precision: str):
    fwd = _forward_kernels()
    key = ("tiled", compile_arch(device), fp32, k_aligned, precision)
    return cached_autotuner(key, lambda: triton.autotune(
        configs=fwd.triton_configs(fwd.tiled_configs(key[1], fp32, k_aligned, precision)),
        key=_TILED_KEY, prune_configs_by={"early_config_prune": fwd.prune_configs},
    )(fwd._nf4_lora_fwd_kernel))


def _autotuned_one_pass(device: torch.device):
    """The one-pass forward autotuned over its list for the device's config family."""
    fwd = _forward_kernels()
    key = ("one_pass", arch(device))
    return cached_autotuner(key, lambda: triton.autotune(
        configs=fwd.triton_configs(fwd.one_pass_configs(key[1])), key=_TILED_KEY,
        prune_configs_by={"early_config_prune": fwd.prune_configs},
    )(fwd._nf4_lora_fwd_one_pass_kernel))


def _autotuned_gemv(device: torch.device, block_m: int, block_r: int, fp32: bool):
    """The one-launch CUDA-core kernel autotuned over its list for BLOCK_M rows (gemv.py)."""
    gv = _gemv_kernels()
    key = ("gemv", compile_arch(device), block_m, block_r, fp32)
    return cached_autotuner(key, lambda: triton.autotune(
        configs=_forward_kernels().triton_configs(gv.gemv_configs(block_m, block_r, fp32,
                                                                  key[1])),
        key=_GEMV_KEY)(gv._nf4_lora_gemv_kernel))


def _autotuned_small_m(device: torch.device, fp32: bool, k_aligned: bool, precision: str,
                       group: bool = False):
    """The small-M kernel (or, `group`, its group form) autotuned over the small-M list."""
    sm = _small_m_kernels()
    key = ("small_m_group" if group else "small_m", compile_arch(device), fp32, k_aligned,
           precision)
    kernel = sm._nf4_lora_fwd_small_m_group_kernel if group else sm._nf4_lora_fwd_small_m_kernel
    return cached_autotuner(key, lambda: triton.autotune(
        configs=_forward_kernels().triton_configs(sm.small_m_configs(fp32, k_aligned,
                                                                     precision, key[1])),
        key=_SMALL_M_GROUP_KEY if group else _SMALL_M_KEY,
        prune_configs_by={"early_config_prune": sm.prune_configs},
    )(kernel))
