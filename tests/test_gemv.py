"""The one-launch CUDA-core forward for M <= 2 (csrc_triton/gemv.py; issue 29): against float64
and plain PyTorch in the same dtype (fastlora.numerics.assert_close), its U as the U kernel's,
deterministic, and taken by the automatic path exactly where it serves."""

from __future__ import annotations

import pytest
import torch

from csrc_triton import gemv as gemv_kernels
from fastlora.launch import forward as launch
from helpers import N, make_case, quick_first
from test_forward import check_forward

SPLIT1 = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
SPLIT3 = {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1}

# (m, dtype, quant, blocksize, double quant, bias, rank, K, config): every dtype, format,
# blocksize from 32 (the kernel's tile width) up, ranks from 1 to 64, K with one and several
# tiles a slice, and split-K with 1, 2 (the interpreter default) and 3 slices
CASES = [
    (1, torch.bfloat16, "nf4", 64, True, True, 16, 256, None),
    (2, torch.float16, "fp4", 128, False, False, 8, 256, None),
    (1, torch.float32, "nf4", 32, True, False, 1, 128, SPLIT1),
    (2, torch.bfloat16, "fp4", 64, False, True, 64, 384, SPLIT3),
    (1, torch.float16, "nf4", 256, True, True, 12, 512, SPLIT3),
    (2, torch.float32, "nf4", 64, True, True, 33, 256, SPLIT1),
]


def _id(c):
    m, dtype, quant, bs, dq, bias, rank, k, config = c
    split = "auto" if config is None else config["SPLIT_K"]
    return (f"m{m}-{str(dtype)[6:]}-{quant}-bs{bs}-dq{int(dq)}-{'bias' if bias else 'nobias'}"
            f"-r{rank}-k{k}-split{split}")


@pytest.mark.parametrize("c", quick_first(CASES), ids=_id)
def test_gemv_matches_reference(c):
    m, dtype, quant, bs, dq, bias, rank, k, config = c
    case = make_case(m, N, k, rank, dtype, quant, bs, dq, bias, 0.0, seed=k + rank)
    check_forward(case, dtype, path="gemv", config=config, base="fused")


@pytest.mark.quick
def test_gemv_u_is_the_u_kernels_and_runs_are_identical():
    """U from the gemv launch equals the U kernel's bit for bit at one slice (one fp32 sum of
    the same products, rounded once); y and U repeat bit for bit run to run (fixed-order sums,
    no atomics on values)."""
    case = make_case(2, N, 256, 8, torch.bfloat16, "nf4", 64, True, True, 0.0, seed=5)
    args = case.args(torch.bfloat16)
    y1, u1 = launch.lora_forward(*args, 0.0, case.seed, path="gemv", config=SPLIT3,
                                 base="fused")
    y2, u2 = launch.lora_forward(*args, 0.0, case.seed, path="gemv", config=SPLIT3,
                                 base="fused")
    assert torch.equal(y1, y2) and torch.equal(u1, u2)
    y_small, u_small = launch.lora_forward(*args, 0.0, case.seed, path="small_m", base="fused")
    # the U kernel sums all of K at once, gemv in 3 slices: the same up to fp32 reassociation,
    # which rounding to bf16 hides for all but a handful of values
    assert (u1.float() - u_small.float()).abs().max() <= \
        2 * torch.finfo(torch.bfloat16).eps * u_small.float().abs().max()
    y_one, u_one = launch.lora_forward(*args, 0.0, case.seed, path="gemv", config=SPLIT1,
                                       base="fused")
    assert torch.equal(u_one, u_small)


@pytest.mark.quick
def test_automatic_path_takes_gemv_where_it_serves():
    aligned = {"K_ALIGNED": True}
    assert launch.choose_path(1, "auto", launch.gemv_ready(aligned, 0.0)) == "gemv"
    assert launch.choose_path(2, "auto", True) == "gemv"
    assert launch.choose_path(3, "auto", True) == "small_m"
    assert not launch.gemv_ready(aligned, 0.1)  # dropout: the U kernel draws the mask
    assert not launch.gemv_ready({"K_ALIGNED": False}, 0.0)
    assert launch.choose_path(1, "auto", False) == "small_m"
    with pytest.raises(ValueError, match="gemv"):
        launch.choose_path(3, "gemv", True)
    with pytest.raises(ValueError, match="gemv"):
        launch.choose_path(1, "gemv", False)
    assert launch.GEMV_MAX_M == gemv_kernels.GEMV_MAX_M


@pytest.mark.parametrize("p,k", [(0.1, 256), (0.0, 200)], ids=["dropout", "k-unaligned"])
def test_outside_gemv_the_two_launch_path_serves(p, k):
    """M = 1 with dropout, or with K not block-aligned, still matches the reference (the U
    kernel and the small-M kernel)."""
    case = make_case(1, N, k, 8, torch.float16, "nf4", 64, True, True, p, seed=11)
    check_forward(case, torch.float16, base="fused")
    with pytest.raises(ValueError, match="gemv"):
        launch.lora_forward(*case.args(torch.float16), p, case.seed, path="gemv")


def test_gemv_config_must_keep_its_tile_width():
    case = make_case(1, N, 256, 8, torch.bfloat16, "nf4", 64, True, False, 0.0, seed=2)
    with pytest.raises(ValueError, match="BLOCK_K is 32"):
        launch.lora_forward(*case.args(torch.bfloat16), 0.0, case.seed, path="gemv",
                            config={**SPLIT1, "BLOCK_K": 64})
