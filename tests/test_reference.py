"""fastlora.reference: the explicit backward against torch.autograd on the same math (float64),
gradcheck, and the Philox port against Triton's own tl.randint."""

import pytest
import torch
import triton

from fastlora import backend, reference
from fastlora.quant import dequantize_4bit_torch
from helpers import DEVICE, make_case


def _autograd_math(x, packed, state, a, b, s, bias, p, seed):
    """The forward of DESIGN.md in plain differentiable torch ops (mask as a constant)."""
    w = dequantize_4bit_torch(packed, state, x.dtype)
    keep = reference.dropout_mask(seed, x.shape[0], x.shape[1], p, x.device) if p else None
    xd = x * keep / (1 - p) if p else x
    y = x @ w.t() + s * (xd @ a.t()) @ b.t()
    return y + bias if bias is not None else y


@pytest.mark.quick
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)],
                         ids=["nf4-dq", "fp4"])
def test_explicit_backward_matches_autograd(dropout_p, bias, quant_type, double_quant):
    case = make_case(13, 40, 72, 6, torch.float32, quant_type, 64, double_quant, bias, dropout_p)
    dy = torch.randn(13, 40, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = {}
    for name, fn in (("explicit", reference.lora_linear_4bit), ("autograd", _autograd_math)):
        x, packed, state, a, b, s, bvec = case.args(torch.float64, requires_grad=True)
        if name == "explicit":
            y = fn(x, packed, state, a, b, s, bvec, dropout_p=dropout_p, training=True,
                   seed=case.seed)
        else:
            y = fn(x, packed, state, a, b, s, bvec, dropout_p, case.seed)
        y.backward(dy)
        grads[name] = (y.detach(), x.grad, a.grad, b.grad, bvec.grad if bias else None)
    for label, got, want in zip(("y", "dx", "dA", "dB", "dbias"), grads["explicit"],
                                grads["autograd"]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=label)


def test_gradcheck_float64():
    case = make_case(4, 12, 64, 3, torch.float32, "nf4", 32, True, True, 0.3)
    x, packed, state, a, b, s, bias = case.args(torch.float64, requires_grad=True)

    def fn(x, a, b, bias):
        return reference.lora_linear_4bit(x, packed, state, a, b, s, bias, dropout_p=0.3,
                                          training=True, seed=case.seed)

    assert torch.autograd.gradcheck(fn, (x, a, b, bias), eps=1e-6, atol=1e-8)


@pytest.mark.quick
def test_leading_dims_and_eval_mode():
    case = make_case(6, 24, 64, 4, torch.float32, "nf4", 64, False, False, 0.5, lead=(2,))
    x, packed, state, a, b, s, _ = case.args(torch.float64)
    y = reference.lora_linear_4bit(x, packed, state, a, b, s, dropout_p=0.5, training=False)
    flat = reference.lora_linear_4bit(x.reshape(12, 64), packed, state, a, b, s)
    assert y.shape == (2, 6, 24)
    torch.testing.assert_close(y.reshape(12, 24), flat, rtol=0, atol=0)


def test_dropout_mask_statistics_and_seeding():
    p, rows, cols = 0.1, 300, 500
    keep = reference.dropout_mask(7, rows, cols, p)
    n = rows * cols
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(keep.sum()) - n * (1 - p)) < 5 * sigma
    assert torch.equal(keep, reference.dropout_mask(7, rows, cols, p))
    assert not torch.equal(keep, reference.dropout_mask(8, rows, cols, p))
    assert bool(reference.dropout_mask(7, 4, 4, 0.0).all())


@pytest.mark.quick
@pytest.mark.skipif(not (backend.interpreter_active() or torch.cuda.is_available()),
                    reason="needs Triton (GPU or interpreter) to draw tl.randint")
@pytest.mark.parametrize("seed,start", [(0, 0), (1234, 10), (2**31 - 5, 2**32 - 100),
                                        (2**40 + 3, 2**33 + 7)],
                         ids=["zero", "small", "offset-crosses-2^32", "64bit-seed"])
def test_philox_port_matches_triton(seed, start):
    from csrc_triton.probes import _philox_probe_kernel

    n = 4096
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(4, n, dtype=torch.int64, device=device)
    _philox_probe_kernel[(triton.cdiv(n, 1024),)](out, seed, start, n, BLOCK=1024)
    want = torch.stack(reference.philox_randint4x(seed, torch.arange(start, start + n,
                                                                     device=device)))
    assert torch.equal(out, want), f"{int((out != want).sum())} of {4 * n} words differ"
    assert torch.equal(want[0], reference.philox_randint(seed, torch.arange(start, start + n,
                                                                            device=device)))


def test_dropout_draws_are_16_bit_halves_of_the_four_words():
    """Eight neighbouring elements share one randint4x call: element 8c + 2w + h takes the
    low (h = 0) or high (h = 1) 16 bits of word w of call c. Thresholds are 16-bit."""
    seed, calls = 99, torch.arange(5, 9)
    words = reference.philox_randint4x(seed, calls)
    offsets = torch.arange(40, 72)  # calls 5..8
    draws = reference.dropout_draws(seed, offsets)
    for i, offset in enumerate(offsets.tolist()):
        c, j = offset // 8 - 5, offset % 8
        expect = (int(words[j // 2][c]) >> (16 * (j % 2))) & 0xFFFF
        assert int(draws[i]) == expect, (offset, int(draws[i]), expect)
    assert reference.dropout_threshold(0.1) == 6554  # 0.1 * 65536 = 6553.6, rounded
    assert reference.dropout_threshold(0.5) == 32768
    assert reference.dropout_threshold(0.0) == 0
