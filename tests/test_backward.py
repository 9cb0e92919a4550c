"""The fused backward (issue 4) against float64 autograd through fastlora.reference, weights
quantised by bitsandbytes; kernels run in Triton's interpreter on CPU (tests/conftest.py).

Bound: fastlora.numerics (2 x the plain-PyTorch error in the same dtype + 1 ulp). The launcher
is tested on its own (U from the reference) and through fastlora.lora_linear_4bit (U from the
fused forward), over the forward's pairwise matrix."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.launch.backward import lora_backward
from fastlora.numerics import assert_close
from helpers import (quick_first, DEVICE, DTYPES, MATRIX, N, bnb_weight, case_id, counting,
                     make_case, reference_pair, run)

GRADS = ("dx", "dA", "dB")


def matrix_case(c: dict):
    dtype = DTYPES[c["dtype"]]
    case = make_case(c["m"], N, c["k"], c["rank"], dtype, c["quant"], c["bs"], c["dq"],
                     c["bias"], c["p"], seed=len(case_id(c)))
    return case, dtype


def grad_out(case, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.x.shape[0], case.lora_B.shape[0], generator=g).to(case.x.device)


def backward_of(case, dtype, dy, need=(True, True, True), x=None, u=None, **kwargs):
    """lora_backward on the case in `dtype`, with U as the reference computes it (unless
    given)."""
    x = case.x.to(dtype) if x is None else x
    a, b = case.lora_A.to(dtype), case.lora_B.to(dtype)
    if u is None:
        u = reference.apply_dropout(x, case.seed, case.dropout_p) @ a.t()
    return dict(zip(GRADS, lora_backward(dy.to(dtype), x, u, case.packed, case.state, a, b,
                                         case.scaling, case.dropout_p, case.seed, *need,
                                         **kwargs)))


def check_grads(out: dict, truth: dict, baseline: dict, dtype, names=GRADS):
    for name in names:
        assert out[name].dtype == dtype, f"{name} is {out[name].dtype}, expected {dtype}"
        assert_close(name, out[name], truth[name], baseline[name])


# ----------------------------------------------------------------------------- the matrix

@pytest.mark.parametrize("c", MATRIX, ids=case_id)
def test_launcher_matches_reference(c, base_path):
    """The whole matrix on each path of dx's base product (fused GEMM; dequantize + cuBLAS)."""
    case, dtype = matrix_case(c)
    dy = grad_out(case)
    truth, baseline = reference_pair(case, dtype, dy)
    check_grads(backward_of(case, dtype, dy), truth, baseline, dtype)


@pytest.mark.parametrize("c", quick_first(MATRIX[::3]), ids=case_id)
def test_forward_backward_matches_reference(c, base_path):
    """The whole layer through fastlora.lora_linear_4bit: the custom ops, U saved by the fused
    forward, dbias; a third of the matrix (the launcher test above runs all of it)."""
    case, dtype = matrix_case(c)
    dy = grad_out(case)
    truth, baseline = reference_pair(case, dtype, dy)
    out = run(fastlora.lora_linear_4bit, case, dtype, dy)
    check_grads(out, truth, baseline, dtype, ("y",) + GRADS + (("dbias",) if c["bias"] else ()))


@pytest.mark.parametrize("rank,k", [(200, 64), (256, 96)], ids=["r200-k64", "r256-k96"])
def test_large_rank(rank, k):
    """Ranks up to 256: R_PAD = 256 tiles in du_db / da."""
    case = make_case(20, 40, k, rank, torch.bfloat16, dropout_p=0.1, seed=3)
    dy = grad_out(case)
    truth, baseline = reference_pair(case, torch.bfloat16, dy)
    check_grads(backward_of(case, torch.bfloat16, dy), truth, baseline, torch.bfloat16)


@pytest.mark.parametrize("blocksize,storage,seed", [
    (4096, torch.uint8, None), (64, torch.bfloat16, None), (128, torch.float32, 2**40 + 5)],
    ids=["bs4096", "storage-bf16", "storage-fp32-seed2^40"])
def test_blocksizes_storage_and_large_seeds(blocksize, storage, seed, base_path):
    """The backward's weight and mask paths off the matrix: one quantisation block larger than
    the whole layer (blocks straddle every row), quant_storage views of the packed bytes, and
    a dropout seed past 2^31 (the Philox key's upper word)."""
    case = make_case(33, N, 200, 8, torch.bfloat16, "nf4", blocksize, True, True, 0.1, seed=6)
    case.packed, case.state = bnb_weight(N, 200, "nf4", blocksize, True, torch.bfloat16,
                                         quant_storage=storage, seed=6)
    assert case.packed.dtype == storage
    if seed is not None:
        case.seed = seed
    dy = grad_out(case)
    truth, baseline = reference_pair(case, torch.bfloat16, dy)
    check_grads(backward_of(case, torch.bfloat16, dy), truth, baseline, torch.bfloat16)


# ----------------------------------------------------------------------------- dropout mask

@pytest.mark.quick
def test_dropout_mask_same_in_forward_and_backward():
    """With W = 0 and A = I (r = K = 16) the forward's U is dropout(x) itself and the
    backward's dx is dropout'(dU @ A): their zero patterns are the two kernels' masks, and both
    must be the reference's mask for the seed, element for element."""
    from fastlora.launch.forward import lora_forward

    m, n, k, p, seed = 37, 24, 16, 0.3, 987654321
    packed, state = bnb_weight(n, k, scale=0.0)  # all-zero weight
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(m, k, generator=g) + 0.5).to(DEVICE)  # no zeros of its own
    a = torch.eye(k, device=DEVICE)
    b = (torch.rand(n, k, generator=g) + 0.5).to(DEVICE)
    dy = (torch.rand(m, n, generator=g) + 0.5).to(DEVICE)  # dU @ A = s * dy @ B > 0 everywhere
    expected = reference.dropout_mask(seed, m, k, p, DEVICE)
    assert 0.5 < expected.float().mean() < 0.9
    _, u = lora_forward(x, packed, state, a, b, 1.0, None, p, seed)
    dx, _, _ = lora_backward(dy, x, u, packed, state, a, b, 1.0, p, seed, True, False, False)
    forward_mask, backward_mask = u != 0, dx != 0
    assert torch.equal(forward_mask, expected), \
        f"forward mask differs at {int((forward_mask != expected).sum())} positions"
    assert torch.equal(backward_mask, expected), \
        f"backward mask differs at {int((backward_mask != expected).sum())} positions"


# ----------------------------------------------------------------------------- determinism

@pytest.mark.quick
def test_gradients_bit_identical_across_runs():
    """dB and dA are sums over M split into parts (several here: M = 100 -> 4 splits in the
    interpreter), added in a fixed order: repeated runs agree bit for bit."""
    case = make_case(100, N, 200, 8, torch.float32, dropout_p=0.1, seed=11)
    dy = grad_out(case)
    first = backward_of(case, torch.float32, dy)
    for _ in range(2):
        again = backward_of(case, torch.float32, dy)
        for name in GRADS:
            assert torch.equal(first[name], again[name]), f"{name} changed between runs"


# ----------------------------------------------------------------------------- what is computed

@pytest.mark.quick
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, False, True),
                                  (False, True, True)],
                         ids=["dx", "dA", "dB", "dx-dB", "dA-dB"])
def test_only_requested_gradients(need):
    """Each subset of gradients: the others are None, the computed ones bit-identical to a run
    computing all three (the flags only switch work off)."""
    case = make_case(17, N, 200, 8, torch.bfloat16, dropout_p=0.1, seed=5)
    dy = grad_out(case)
    full = backward_of(case, torch.bfloat16, dy)
    part = backward_of(case, torch.bfloat16, dy, need)
    for name, wanted in zip(GRADS, need):
        if wanted:
            assert torch.equal(part[name], full[name]), f"{name} differs from the full run"
        else:
            assert part[name] is None, f"{name} was not requested but returned"


@pytest.mark.quick
@pytest.mark.parametrize("k,p,rank,dtype,in_gemm", [
    (256, 0.0, 20, "bf16", True), (128, 0.0, 64, "fp16", True), (256, 0.1, 20, "bf16", True),
    (128, 0.3, 64, "fp16", True), (200, 0.0, 20, "bf16", False), (256, 0.0, 20, "fp32", False),
    (200, 0.1, 20, "bf16", False)],
    ids=["bf16", "fp16-r64", "dropout", "dropout-fp16-r64", "k-unaligned", "fp32",
         "dropout-k-unaligned"])
def test_where_dx_lora_term_is_made(k, p, rank, dtype, in_gemm, monkeypatch):
    """dx's LoRA term: for 16-bit activations with K on the blocksize the fused dx GEMM makes
    it (over the rank in chunks of 16: r = 20 leaves a masked chunk), so without dropout dx
    alone costs no dA pass; with dropout the dA kernel runs to store the mask as bits, which
    the GEMM applies (the interpreter takes that route where any GPU does:
    csrc_triton/backward.py DROPOUT_BITS_TARGETS); otherwise the dA kernel writes the term
    and runs even when dA is not wanted. dx matches float64 either way."""
    from csrc_triton.backward import DROPOUT_BITS_TARGETS

    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    in_gemm = in_gemm and (p == 0.0 or bool(DROPOUT_BITS_TARGETS))  # none on Triton 3.5 / 3.6
    dt = DTYPES[dtype]
    case = make_case(33, N, k, rank, dt, dropout_p=p, seed=4)
    dy = grad_out(case)
    truth, baseline = reference_pair(case, dt, dy)
    with counting(execute=True) as launched:
        out = backward_of(case, dt, dy, (True, False, False))
    assert launched == {"_lora_bwd_du_db_kernel": 1, "_nf4_lora_bwd_dx_kernel": 1,
                        **({} if in_gemm and p == 0.0 else {"_lora_bwd_da_kernel": 1})}
    check_grads(out, truth, baseline, dt, ("dx",))


@pytest.mark.quick
@pytest.mark.parametrize("m,k,p", [(33, 256, 0.1), (70, 96, 0.5)], ids=["m33", "m70-k96"])
def test_dropout_bits_are_the_reference_mask(m, k, p):
    """The dA kernel's mask bits for the dx GEMM (WRITE_BITS): bit j of word w of row m is
    fastlora.reference.dropout_mask's element (m, 32 w + j), drawn from the same seed (row
    splits and column tiles each write their own words)."""
    from fastlora.launch.backward import Configs, da

    case = make_case(m, N, k, 16, torch.bfloat16, dropout_p=p, seed=11)
    x = case.x.to(torch.bfloat16)
    du = torch.randn(m, 16).to(x)
    bits = torch.full((m, k // 32), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)
    da(Configs(x, None), x, du, case.lora_A.to(x), p, case.seed, None, False, bits=bits)
    unpacked = (bits.unsqueeze(-1) >> torch.arange(32, device=DEVICE)) & 1
    keep = reference.dropout_mask(case.seed, m, k, p, DEVICE)
    assert torch.equal(unpacked.view(m, k).bool(), keep)


@pytest.mark.parametrize("block_k,bits", [(16, False), (32, True)])
def test_dropout_bits_with_a_pinned_da_tile(block_k, bits, monkeypatch):
    """A pinned dA config of 16 columns (not whole 32-bit words of mask bits) keeps dx's
    dropout term on the dA kernel's write; 32 columns take the bits; dx matches float64."""
    from csrc_triton.backward import DROPOUT_BITS_TARGETS
    from fastlora.launch import backward as launch_bw

    bits = bits and bool(DROPOUT_BITS_TARGETS)  # none on Triton 3.5 / 3.6
    real, seen = launch_bw.da, []
    monkeypatch.setattr(launch_bw, "da", lambda *a, **kw: seen.append(kw["bits"]) or real(*a, **kw))
    case = make_case(33, N, 256, 8, torch.bfloat16, dropout_p=0.2, seed=6)
    dy = grad_out(case)
    truth, baseline = reference_pair(case, torch.bfloat16, dy)
    config = {"da": {"BLOCK_M": 16, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1}}
    out = backward_of(case, torch.bfloat16, dy, (True, False, False), config=config,
                      base="fused")
    assert len(seen) == 1 and (seen[0] is not None) == bits
    check_grads(out, truth, baseline, torch.bfloat16, ("dx",))


@pytest.mark.parametrize("target,bits", [("sm_80", True), ("sm_89", True), ("sm_100", True),
                                         ("sm_120", True), ("sm_90", False)])
def test_dropout_bits_only_where_they_compile_without_spills(target, bits, monkeypatch):
    """With dropout, the dx GEMM applies the mask bits only on the compile targets where its
    configs take them without spills (csrc_triton/backward.py DROPOUT_BITS_TARGETS); on sm_90
    the dA kernel writes the masked term, as before (launches counted, not run)."""
    from csrc_triton.backward import DROPOUT_BITS_TARGETS
    from fastlora.gpus import CONFIG_FAMILY
    from fastlora.launch import backward as launch_bw

    bits = bits and target in DROPOUT_BITS_TARGETS  # none on Triton 3.5 / 3.6
    case = make_case(33, N, 256, 16, torch.bfloat16, dropout_p=0.1, seed=4)
    x = case.x.to(torch.bfloat16)
    du = torch.randn(33, 16).to(x)
    cfgs = launch_bw.Configs(x, None)
    cfgs.tuned = (CONFIG_FAMILY[target], False, "ieee", target)  # as on such a GPU
    monkeypatch.setattr(launch_bw, "dx_path", lambda *a, **kw: "fused")
    seen = {}
    monkeypatch.setattr(launch_bw, "da", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(launch_bw, "_dx_launch", lambda *a: seen.update(lora=a[5]))
    launch_bw.dx_and_da(cfgs, grad_out(case).to(x), x, du, case.lora_A.to(x), 0.1, case.seed,
                        case.packed, case.state, True, False)
    assert (seen["bits"] is not None) == bits
    assert (seen["lora"] is not None) == bits
    if bits:
        assert seen["lora"].bits is seen["bits"] and seen["lora"].keep_scale == 1 / 0.9


def test_strided_x_and_explicit_config():
    """x as a non-contiguous view gives the same gradients as its contiguous copy; an
    explicit config (other block sizes) stays within the bound."""
    case = make_case(33, N, 200, 12, torch.float16, dropout_p=0.1, seed=9)
    dy = grad_out(case)
    wide = torch.zeros(2 * 200, 33, dtype=torch.float16, device=DEVICE)
    wide[::2] = case.x.to(torch.float16).t()
    strided = wide[::2].t()  # [33, 200], strides (1, 66)
    assert not strided.is_contiguous() and torch.equal(strided, case.x.to(torch.float16))
    # one U for both: torch's own fp16 CPU matmul may round a column-major x differently
    # (seen: 3e-5 apart on some CPUs), which is torch's business, not the kernels'
    u = reference.apply_dropout(case.x.to(torch.float16), case.seed, case.dropout_p) \
        @ case.lora_A.to(torch.float16).t()
    plain = backward_of(case, torch.float16, dy, u=u)
    viewed = backward_of(case, torch.float16, dy, x=strided, u=u)
    for name in GRADS:
        assert torch.equal(plain[name], viewed[name]), f"{name} differs for a strided x"
    config = {"du_db": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
              "da": {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
              "dx": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1,
                     "num_warps": 4, "num_stages": 1}}
    truth, baseline = reference_pair(case, torch.float16, dy)
    check_grads(backward_of(case, torch.float16, dy, config=config), truth, baseline,
                torch.float16)


def test_empty_m():
    case = make_case(5, N, 200, 8, torch.bfloat16)
    x = case.x[:0].to(torch.bfloat16)
    a, b = case.lora_A.to(torch.bfloat16), case.lora_B.to(torch.bfloat16)
    empty = {"dtype": torch.bfloat16, "device": DEVICE}
    dx, da, db = lora_backward(torch.empty(0, N, **empty), x, torch.empty(0, 8, **empty),
                               case.packed, case.state, a, b, 2.0, 0.0, 0, True, True, True)
    assert dx.shape == (0, 200) and dx.dtype == torch.bfloat16
    assert torch.equal(da, torch.zeros_like(a)) and torch.equal(db, torch.zeros_like(b))


# ----------------------------------------------------------------------------- bad input

def call_with(case, dy=None, u=None):
    """lora_backward on a bf16 case with dy / u overridden."""
    x, a, b = (t.to(torch.bfloat16) for t in (case.x, case.lora_A, case.lora_B))
    dy = grad_out(case).to(torch.bfloat16) if dy is None else dy
    u = x @ a.t() if u is None else u
    return lora_backward(dy, x, u, case.packed, case.state, a, b, 2.0, 0.0, 0, True, True,
                         True)


@pytest.mark.parametrize("bad,error,match", [
    (lambda dy: dy[:, :-1], ValueError, r"dy must be \[M, N\] = \[8, 72\].*got \(8, 71\)"),
    (lambda dy: dy[:-1], ValueError, r"dy must be \[M, N\].*got \(7, 72\)"),
    (lambda dy: dy.float(), TypeError, r"dy is torch.float32 but x is torch.bfloat16"),
    (lambda dy: dy.tolist(), TypeError, r"dy must be a tensor"),
], ids=["short-n", "short-m", "dtype", "not-a-tensor"])
def test_bad_dy(bad, error, match):
    case = make_case(8, N, 200, 8, torch.bfloat16)
    with pytest.raises(error, match=match):
        call_with(case, dy=bad(grad_out(case).to(torch.bfloat16)))


def test_bad_saved_u():
    case = make_case(8, N, 200, 8, torch.bfloat16)
    with pytest.raises(ValueError, match=r"u must be \[8, 8\]"):
        call_with(case, u=torch.zeros(8, 7, dtype=torch.bfloat16, device=DEVICE))


def test_large_m_pruning_times_the_headline_configs_only():
    """From an M bucket of 4096 on the autotuner times only the large_m configs (the ones the
    compile report gates: dx at 0.85 of tensor-core peak, du_db / da at 0.75 of HBM), where
    they fit the rank and, for dx, K is aligned (their per-element decode spills)."""
    from csrc_triton import backward as kernels

    for (arch, fp32), configs in kernels.CONFIGS["dx"].items():
        if fp32:
            continue
        big = kernels.prune_configs(configs, 8192, 16, k_aligned=True)
        assert big and all(c.large_m for c in big), (arch, big)
        unaligned = kernels.prune_configs(configs, 8192, 16, k_aligned=False)
        assert unaligned and not any(c.large_m for c in unaligned), (arch, unaligned)
        small = kernels.prune_configs(configs, 256, 16)
        assert len(small) > 1 and any(not c.large_m for c in small)
    sm80_du_db = kernels.CONFIGS["du_db"][("sm_80", False)]
    assert all(c.large_m for c in kernels.prune_configs(sm80_du_db, 4096, 16))
    # the sm_80 du_db headline is shipped for r <= 16: at R_PAD 64 every fitting config runs
    wide = kernels.prune_configs(sm80_du_db, 4096, 64)
    assert wide and not any(c.large_m for c in wide)
    da = kernels.CONFIGS["da"][("sm_90", False)]
    assert [c.kwargs for c in kernels.prune_configs(da, 4096, 64)] == [
        {"BLOCK_M": 64, "BLOCK_K": 64}]
