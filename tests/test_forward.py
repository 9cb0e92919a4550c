"""The fused forward (issue 3) against fastlora.reference in float64, weights quantised by
bitsandbytes; kernels run in Triton's interpreter on CPU (tests/conftest.py).

Bound: fastlora.numerics (2 x the plain-PyTorch error in the same dtype + 1 ulp)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.launch import forward as launch
from fastlora.numerics import assert_close
from helpers import (quick_first, AXES, DEVICE, DTYPES, MATRIX, N, bnb_weight, case_id, counting,
                     make_case, reference_pair, run, tag_dispatch_candidates)


# ----------------------------------------------------------------------------- helpers

def u_truth(case, dtype):
    """(float64 truth, plain PyTorch in dtype) of u = dropout(x) @ A^T."""
    x, a = case.x.to(dtype), case.lora_A.to(dtype)
    truth = reference.apply_dropout(x.double(), case.seed, case.dropout_p) @ a.double().t()
    baseline = reference.apply_dropout(x, case.seed, case.dropout_p) @ a.t()
    return truth, baseline


def check_forward(case, dtype, x=None, **kwargs):
    """Run lora_forward on the case (x overridden when given) and check y and u."""
    args = list(case.args(dtype))
    if x is not None:
        args[0] = x
    truth, baseline = reference_pair(case, dtype)
    y, u = launch.lora_forward(*args, case.dropout_p, case.seed, **kwargs)
    assert y.dtype == dtype and u.dtype == dtype
    assert_close("y", y, truth["y"], baseline["y"])
    assert_close("u", u, *u_truth(case, dtype))
    return y, u


# ----------------------------------------------------------------------------- the matrix

@pytest.mark.quick
def test_matrix_covers_every_pair():
    for a, b in itertools.combinations(AXES, 2):
        seen = {(c[a], c[b]) for c in MATRIX}
        missing = set(itertools.product(AXES[a], AXES[b])) - seen
        assert not missing, f"axes {a} x {b}: pairs {sorted(missing)} not covered"


@pytest.mark.parametrize("c", quick_first(MATRIX), ids=case_id)
def test_forward_matches_reference(c, base_path):
    """The whole matrix on each base-product path (the fused GEMMs; dequantize + cuBLAS)."""
    dtype = DTYPES[c["dtype"]]
    case = make_case(c["m"], N, c["k"], c["rank"], dtype, c["quant"], c["bs"], c["dq"],
                     c["bias"], c["p"], seed=len(case_id(c)))
    check_forward(case, dtype)


# ----------------------------------------------------------------------------- paths and configs

SMALL_SPLIT1 = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
SMALL_SPLIT3 = {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1}
TILED_PLAIN = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "W_FIRST": False,
               "num_warps": 4, "num_stages": 1}
TILED_WIDE_K = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1, "W_FIRST": True,
                "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("path,config", [
    ("small_m", None), ("small_m", SMALL_SPLIT1), ("small_m", SMALL_SPLIT3),
    ("tiled", None), ("tiled", TILED_PLAIN), ("tiled", TILED_WIDE_K),
], ids=["small-auto", "small-split1", "small-split3", "tiled-auto", "tiled-xfirst",
        "tiled-bk128"])
@pytest.mark.parametrize("k", [256, 200], ids=["k256", "k200"])
def test_paths_and_configs(path, config, k):
    """Both paths (forced) on the same small-M case, and explicit configs: split-K with 1 and 3
    slices, the sm_80 orientation (x first), and BLOCK_K spanning two 64-blocks."""
    case = make_case(11, N, k, 12, torch.bfloat16, "nf4", 64, True, True, 0.1, seed=7)
    check_forward(case, torch.bfloat16, path=path, config=config)


@pytest.mark.quick
def test_small_and_tiled_paths_agree():
    case = make_case(16, N, 256, 8, torch.float16, "fp4", 128, False, True, 0.0, seed=3)
    args = case.args(torch.float16)
    y_small, u_small = launch.lora_forward(*args, 0.0, case.seed, path="small_m")
    y_tiled, u_tiled = launch.lora_forward(*args, 0.0, case.seed, path="tiled")
    assert torch.equal(u_small, u_tiled)
    diff = (y_small.float() - y_tiled.float()).abs().max().item()
    # both are fp32 sums of the same products, in a different order: a few fp16 ulps at most
    assert diff <= 4 * torch.finfo(torch.float16).eps * y_tiled.abs().max().item(), diff


def test_choose_path():
    assert launch.choose_path(16) == "small_m"
    assert launch.choose_path(17) == "tiled"
    assert launch.choose_path(3, "tiled") == "tiled"
    with pytest.raises(ValueError, match="small_m"):
        launch.choose_path(17, "small_m")
    with pytest.raises(ValueError, match="path"):
        launch.choose_path(3, "fast")


# ----------------------------------------------------------------------------- the one-pass forward

def one_pass_config(w_first, block_k=32):
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": block_k, "GROUP_M": 2, "W_FIRST": w_first,
            "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("w_first", [True, False], ids=["yT", "y"])
@pytest.mark.parametrize("dtype,quant,rank,bias,k,block_k", [
    (torch.bfloat16, "nf4", 12, True, 256, 32),
    (torch.float16, "fp4", 40, False, 192, 128),
], ids=["bf16-nf4-r12-bias", "fp16-fp4-r40-k192-bk128"])
def test_one_pass_forward(w_first, dtype, quant, rank, bias, k, block_k):
    """U and y in one launch (issue 30 part 4), both tile orientations, against float64: M = 40
    and N = 72 end mid-tile, rank 12 / 40 pad to 16 / 64, K = 192 with BLOCK_K 128 ends
    mid-tile (blocksize 64: every K tile still starts on a block). U comes from the programs of
    the first N tile alone; the other two N tiles make the same U and only use it."""
    case = make_case(40, N, k, rank, dtype, quant, 64, True, bias, 0.0, seed=13)
    with counting(execute=True) as launches:
        check_forward(case, dtype, path="one_pass", config=one_pass_config(w_first, block_k))
    assert launches == {"_nf4_lora_fwd_one_pass_kernel": 1}


def test_one_pass_interpreter_default_and_refusals():
    """path='one_pass' with the interpreter's config; auto never takes it off a GPU; it refuses
    what it cannot serve (dropout, fp32, a rank past 64, K off the blocksize)."""
    case = make_case(20, N, 128, 8, torch.bfloat16, "nf4", 64, True, True, 0.0, seed=3)
    with counting(execute=True) as launches:
        check_forward(case, torch.bfloat16, path="one_pass")
    assert launches == {"_nf4_lora_fwd_one_pass_kernel": 1}
    with counting(execute=True) as launches:
        check_forward(case, torch.bfloat16)
    assert launches == {"_lora_u_kernel": 1, "_nf4_lora_fwd_kernel": 1}
    for why, c, dtype in [
            ("dropout", make_case(20, N, 128, 8, torch.bfloat16, dropout_p=0.1, seed=3),
             torch.bfloat16),
            ("fp32", make_case(20, N, 128, 8, torch.float32, seed=3), torch.float32),
            ("rank 72", make_case(20, N, 128, 72, torch.bfloat16, seed=3), torch.bfloat16),
            ("K 200", make_case(20, N, 200, 8, torch.bfloat16, seed=3), torch.bfloat16)]:
        with pytest.raises(ValueError, match="one_pass"):
            launch.lora_forward(*c.args(dtype), c.dropout_p, c.seed, path="one_pass")


@pytest.mark.parametrize("fastest", ["one_pass", "fused", "dequant"])
def test_one_pass_timed_by_the_dispatcher(fastest, monkeypatch):
    """Where the one-pass forward can serve a call, auto on a GPU times it next to U + the
    tiled GEMM ('fused') and the dequantize path and keeps the fastest (the timer mocked here:
    candidates in that order, the chosen one fastest). The public op's next call runs the
    pick's launches; y and the gradients (the backward reads the stored U) match float64."""
    from fastlora.launch import dispatch

    order = [("forward", path) for path in ("fused", "dequant", "one_pass")]
    timed, running = [], []
    tag_dispatch_candidates(monkeypatch, running)

    def fake_time(fn):
        fn()
        timed.append(running[0])
        return 1.0 if running[0] in (("forward", fastest), ("dx", "fused")) else 2.0
    dispatch.clear_picks()
    monkeypatch.setattr(dispatch, "_can_time", lambda device: True)
    monkeypatch.setattr(dispatch, "_time_ms", fake_time)
    try:
        case = make_case(24, N, 128, 8, torch.bfloat16, "nf4", 64, True, True, 0.0, seed=21)
        fastlora.lora_linear_4bit(*case.args(torch.bfloat16), **case.kwargs())
        assert timed == order
        assert dispatch.pick_for("forward", DEVICE, torch.bfloat16, N, 128, 24,
                                 "one_pass") == fastest
        grad = torch.randn(24, N, generator=torch.Generator().manual_seed(5))
        with counting(execute=True) as launches:
            got = run(fastlora.lora_linear_4bit, case, torch.bfloat16, grad)
        assert timed == order + [("dx", "fused"), ("dx", "dequant")]  # forward kept
        forward = {"one_pass": {"_nf4_lora_fwd_one_pass_kernel": 1},
                   "fused": {"_lora_u_kernel": 1, "_nf4_lora_fwd_kernel": 1},
                   "dequant": {"_lora_u_kernel": 1, "_dequant_4bit_kernel": 1}}[fastest]
        assert all(launches[name] >= count for name, count in forward.items())
        other = {"_nf4_lora_fwd_one_pass_kernel", "_nf4_lora_fwd_kernel"} - set(forward)
        assert not other & set(launches), launches
        truth, baseline = reference_pair(case, torch.bfloat16, grad)
        for name in ("y", "dx", "dA", "dB", "dbias"):
            assert_close(name, got[name], truth[name], baseline[name])
    finally:
        dispatch.clear_picks()


# ----------------------------------------------------------------------------- shapes, views, formats

def test_3d_input_through_public_op():
    case = make_case(5, N, 200, 8, torch.bfloat16, "nf4", 64, True, True, 0.1, seed=11,
                     lead=(3,))
    truth, baseline = reference_pair(case, torch.bfloat16)
    y = fastlora.lora_linear_4bit(*case.args(torch.bfloat16), **case.kwargs())
    assert y.shape == (3, 5, N)
    assert_close("y", y, truth["y"], baseline["y"])


@pytest.mark.parametrize("view", ["column-slice", "transposed"])
def test_non_contiguous_x(view, base_path):
    case = make_case(20, N, 200, 8, torch.float16, "nf4", 64, False, False, 0.1, seed=5)
    x = case.x.to(torch.float16)
    if view == "column-slice":  # row stride 2K, unit column stride
        big = torch.zeros(20, 400, dtype=torch.float16, device=DEVICE)
        big[:, ::2] = x
        x_view = big[:, ::2]
    else:  # column-major storage: stride (1, M)
        x_view = x.t().contiguous().t()
    assert not x_view.is_contiguous() and torch.equal(x_view, x)
    check_forward(case, torch.float16, x=x_view)
    truth, baseline = reference_pair(case, torch.float16)
    y = fastlora.lora_linear_4bit(x_view, *case.args(torch.float16)[1:], **case.kwargs())
    assert_close("y (public op)", y, truth["y"], baseline["y"])


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quant_storage_views(storage, base_path):
    case = make_case(17, N, 200, 8, torch.bfloat16, "nf4", 64, True, True, 0.0, seed=2)
    case.packed, case.state = bnb_weight(N, 200, "nf4", 64, True, torch.bfloat16,
                                         quant_storage=storage, seed=2)
    assert case.packed.dtype == storage
    check_forward(case, torch.bfloat16)


@pytest.mark.parametrize("blocksize,m,k,config", [
    (32, 17, 200, None), (4096, 5, 200, None), (32, 17, 256, TILED_WIDE_K)],
    ids=["bs32", "bs4096", "bs32-k256-bk128"])
def test_extreme_blocksizes(blocksize, m, k, config):
    """K = 200 straddles blocks (per-element decode); K = 256 with BLOCK_K = 128 takes the
    vectorised decode with four 32-blocks per tile row."""
    case = make_case(m, N, k, 8, torch.float16, "nf4", blocksize, True, True, 0.1, seed=4)
    check_forward(case, torch.float16, config=config)


def test_large_rank_chunks_and_public_op(base_path):
    """r = 200: the U kernel and the LoRA term pad the rank to 256 (lora_init: 8 unrolled
    chunks of 32, the 56 columns past r zero-padded)."""
    case = make_case(20, N, 256, 200, torch.bfloat16, "fp4", 256, False, True, 0.0, seed=9)
    check_forward(case, torch.bfloat16)
    truth, baseline = reference_pair(case, torch.bfloat16)
    y = fastlora.lora_linear_4bit(*case.args(torch.bfloat16), **case.kwargs())
    assert_close("y (public op)", y, truth["y"], baseline["y"])


def test_empty_m():
    case = make_case(0, N, 200, 8, torch.float16, seed=1)
    y, u = launch.lora_forward(*case.args(torch.float16), 0.0, case.seed)
    assert y.shape == (0, N) and u.shape == (0, 8)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.quick
@pytest.mark.parametrize("p,seed,k", [(0.1, 1234, 200), (0.5, 2**40 + 5, 200), (0.1, 77, 203)],
                         ids=["p0.1", "p0.5-seed2^40", "p0.1-k203-ungrouped"])
def test_dropout_mask_is_the_reference_mask(p, seed, k):
    """With A = I, u is dropout(x) itself: bit for bit reference.apply_dropout (Philox port),
    and the kept fraction is within 5 binomial sigmas of 1 - p. K = 200: eight elements per
    Philox call (DROPOUT_GROUPED); K = 203: one call per element, the same bits."""
    m = 64
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(0)) + 5.0).to(DEVICE)  # no 0
    eye = torch.eye(k, device=DEVICE)
    packed, state = bnb_weight(N, k, blocksize=64, dtype=torch.float32, seed=1)
    _, u = launch.lora_forward(x, packed, state, eye, torch.zeros(N, k, device=DEVICE), 1.0,
                               None, p, seed)
    expected = reference.apply_dropout(x, seed, p)
    mismatch = (u != expected).sum().item()
    assert mismatch == 0, f"{mismatch} of {m * k} elements differ from the reference dropout"
    kept = (u != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (m * k))
    assert abs(kept - (1 - p)) <= 5 * sigma, f"kept {kept:.4f}, expected {1 - p} +- {5 * sigma:.4f}"


def test_the_op_keys_dropout_with_the_seeds_high_word():
    """The op hands its seed to the kernels as a device tensor plus the seed's high word on the
    host (fastlora.checks.DeviceSeed; the kernels load the low word: csrc_triton/common.py
    dropout_seed): with a seed past 2^32 it gives, bit for bit, what the launcher gives for the
    same int seed (tied to fastlora.reference's mask above), and another high word gives
    another mask."""
    case = make_case(20, N, 200, 8, torch.float32, "nf4", 64, True, False, 0.5, seed=6)
    x, packed, state, a, b, s, _ = case.args(torch.float32)
    seed = 2**40 + 5
    got = fastlora.lora_linear_4bit(x, packed, state, a, b, s, dropout_p=0.5, training=True,
                                    seed=seed)
    want, _ = launch.lora_forward(x, packed, state, a, b, s, None, 0.5, seed)
    assert torch.equal(got, want)
    low_only = fastlora.lora_linear_4bit(x, packed, state, a, b, s, dropout_p=0.5,
                                         training=True, seed=seed % 2**32)
    assert not torch.equal(low_only, got)


def test_dropout_same_seed_same_output():
    case = make_case(20, N, 200, 8, torch.float16, "nf4", 64, True, False, 0.1, seed=6)
    args = case.args(torch.float16)
    y1 = fastlora.lora_linear_4bit(*args, dropout_p=0.1, training=True, seed=99)
    y2 = fastlora.lora_linear_4bit(*args, dropout_p=0.1, training=True, seed=99)
    y3 = fastlora.lora_linear_4bit(*args, dropout_p=0.1, training=True, seed=100)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


# ----------------------------------------------------------------------------- configs, checks

def test_dot_precision_follows_torch():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert launch.dot_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert launch.dot_precision(torch.float32) == "ieee"
        assert launch.dot_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit inputs
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9 has only the legacy allow_tf32 flag")
def test_dot_precision_follows_torchs_new_precision_api():
    """Once a user sets torch's new fp32_precision API, reading the legacy allow_tf32 flag
    raises; the launchers must read the new one."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for setting, want in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = setting
            assert launch.dot_precision(torch.float32) == want
    finally:
        matmul.fp32_precision = saved


def test_config_pruning_rules():
    from csrc_triton import forward as kernels
    from csrc_triton.common import m_bucket

    assert [m_bucket(m) for m in (17, 33, 100, 5000, 10**6)] == [32, 64, 128, 8192, 8192]
    big = kernels._cfg(128, 128, 64, 8, 3, True)
    assert kernels.keep_config(big, 8192, 4096, 64, 2, 232448)
    assert not kernels.keep_config(big, 64, 4096, 64, 2, 232448)  # BLOCK_M past the M bucket
    assert not kernels.keep_config(big, 8192, 4096, 64, 2, 70_000)  # shared memory
    wide_k = kernels._cfg(32, 64, 256, 4, 2, True)
    assert kernels.keep_config(wide_k, 8192, 4096, 64, 2, 232448)
    assert not kernels.keep_config(wide_k, 8192, 4096, 32, 2, 232448)  # BLOCK_K > 4 x 32
    assert not kernels.keep_config(wide_k, 8192, 100, 64, 2, 232448)  # BLOCK_K past K
    # sm_100 (B200) runs sm_80's lists with its 16-bit headline at BLOCK_K 64 (SIBLING_FIXES)
    b200 = [c for c in kernels.tiled_configs("sm_100", False) if c["BLOCK_M"] == 256
            and c["BLOCK_N"] == 128]
    assert [(c["BLOCK_K"], c["num_stages"]) for c in b200] == [(64, 3), (64, 4)]
    assert kernels.tiled_configs("sm_100", False)[len(b200):] \
        == kernels.tiled_configs("sm_80", False)[len(b200):]
    assert kernels.tiled_configs("sm_100", True) == kernels.tiled_configs("sm_80", True)
    large = kernels.SM90_LARGE_M_CONFIGS + kernels.SM80_LARGE_M_CONFIGS + b200
    for arch in ("sm_80", "sm_90", "sm_100"):
        for fp32 in (False, True):
            for cfg in kernels.tiled_configs(arch, fp32):
                # y^T tiles on sm_90, and for sm_80's 256-row headline tiles
                assert cfg["W_FIRST"] == (arch == "sm_90" or cfg in large), cfg
    # from M = 4096 on only the headline (LARGE_M) tiles are timed, where the list has them
    for arch in ("sm_80", "sm_90", "sm_100"):
        full = kernels.tiled_configs(arch, False)
        assert kernels.prefer_large_m(full, 2048) == full
        picked = kernels.prefer_large_m(full, 4096)
        assert picked and all(c["BLOCK_M"] == 256 and c in large for c in picked)
        fp32 = kernels.tiled_configs(arch, True)
        assert kernels.prefer_large_m(fp32, 8192) == fp32  # no headline tile there: all stay


def _bad(case, **override):
    args = dict(zip(("x", "packed", "state", "lora_A", "lora_B", "scaling", "bias"),
                    case.args(torch.float16)))
    args.update(p=0.0, seed=0)
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,name", [
    (lambda c: {"x": c.x.new_zeros(4, 100, dtype=torch.float16)}, ValueError, "x"),
    (lambda c: {"x": c.x.new_zeros(2, 4, 200, dtype=torch.float16)}, ValueError, "x"),
    (lambda c: {"lora_A": c.x.new_zeros(8, 100, dtype=torch.float16)}, ValueError, "lora_A"),
    (lambda c: {"lora_B": c.x.new_zeros(N, 4, dtype=torch.float16)}, ValueError, "lora_B"),
    (lambda c: {"lora_A": c.lora_A.float()}, TypeError, "lora_A"),
    (lambda c: {"bias": c.x.new_zeros(N, dtype=torch.float32)}, TypeError, "bias"),
    (lambda c: {"lora_B": torch.zeros(N, 8, dtype=torch.float16, device="meta")}, ValueError,
     "lora_B"),
    (lambda c: {"p": 1.0}, ValueError, "dropout_p"),
    (lambda c: {"p": -0.1}, ValueError, "dropout_p"),
], ids=["x-last-dim", "x-3d", "A-shape", "B-rank", "A-dtype", "bias-dtype", "B-device",
        "p-one", "p-negative"])
@pytest.mark.quick
def test_bad_input_names_the_argument(override, error, name):
    case = make_case(4, N, 200, 8, torch.float16, seed=1)
    args = _bad(case, **override(case))
    with pytest.raises(error, match=name):
        launch.lora_forward(args.pop("x"), args.pop("packed"), args.pop("state"),
                            args.pop("lora_A"), args.pop("lora_B"), args.pop("scaling"),
                            args.pop("bias"), args.pop("p"), args.pop("seed"))


def test_bad_config_is_rejected():
    case = make_case(20, N, 200, 8, torch.float16, seed=1)
    with pytest.raises(ValueError, match="config"):
        launch.lora_forward(*case.args(torch.float16), 0.0, 0, config={"BLOCK_M": 32})
