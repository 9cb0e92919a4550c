"""The bad-input battery (issue 7 item 2): every public entry point given something wrong
answers with a clear error (type, and a message naming the argument) or a correct result;
nothing crashes the process, hangs, or returns garbage silently. CLI cases: tests/test_cli.py
(one-line error, non-zero exit, no traceback)."""

import dataclasses

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRALinear4bit
from fastlora.quant import QuantState
from helpers import make_case

K, N, R = 64, 40, 4


pytestmark = pytest.mark.quick  # the whole module is in the quick tier


@pytest.fixture(scope="module")
def case():
    return make_case(5, N, K, R, torch.float32, "nf4", 64, True, True)


def _op(case, **override):
    args = dict(x=case.x, packed=case.packed, state=case.state, lora_A=case.lora_A,
                lora_B=case.lora_B, scaling=case.scaling, bias=case.bias)
    args.update(override)
    return fastlora.lora_linear_4bit(**args)


def _state_with(case, **fields):
    s = case.state
    values = dict(absmax=s.absmax, shape=s.shape, code=s.code, blocksize=s.blocksize,
                  quant_type=s.quant_type, dtype=s.dtype, offset=s.offset, state2=s.state2)
    values.update(fields)
    return QuantState(**values)


def _packed_grad(case):
    return case.packed.reshape(-1).view(torch.float32).clone().unsqueeze(1).requires_grad_(True)


OP_CASES = {
    # shapes
    "x-last-dim": (lambda c: _op(c, x=c.x[:, :-1]), ValueError, "x's last dimension"),
    "x-scalar": (lambda c: _op(c, x=torch.tensor(1.0)), ValueError, "x's last dimension"),
    "rank-0": (lambda c: _op(c, lora_A=c.lora_A[:0], lora_B=c.lora_B[:, :0]), ValueError,
               "lora_A"),
    "A-wrong-K": (lambda c: _op(c, lora_A=c.lora_A[:, :-1]), ValueError, "lora_A"),
    "B-wrong-rank": (lambda c: _op(c, lora_B=c.lora_B[:, :-1]), ValueError, "lora_B"),
    "B-wrong-N": (lambda c: _op(c, lora_B=c.lora_B[:-1]), ValueError, "lora_B"),
    "bias-wrong-N": (lambda c: _op(c, bias=c.bias[:-1]), ValueError, "bias"),
    # dtypes
    "x-int": (lambda c: _op(c, x=c.x.to(torch.int32)), TypeError, "x must be a floating"),
    "x-complex": (lambda c: _op(c, x=c.x.to(torch.complex64)), TypeError,
                  "x must be a floating"),
    "A-dtype": (lambda c: _op(c, lora_A=c.lora_A.half()), TypeError, "lora_A"),
    "bias-dtype": (lambda c: _op(c, bias=c.bias.double()), TypeError, "bias"),
    # devices
    "A-device": (lambda c: _op(c, lora_A=c.lora_A.to("meta")), ValueError, "lora_A on meta"),
    # scalars
    "scaling-str": (lambda c: _op(c, scaling="2"), TypeError, "scaling"),
    "scaling-nan": (lambda c: _op(c, scaling=float("nan")), TypeError, "scaling"),
    "dropout-1": (lambda c: fastlora.lora_linear_4bit(c.x, c.packed, c.state, c.lora_A,
                                                      c.lora_B, 1.0, dropout_p=1.0),
                  ValueError, "dropout_p"),
    "seed-negative": (lambda c: fastlora.lora_linear_4bit(c.x, c.packed, c.state, c.lora_A,
                                                          c.lora_B, 1.0, seed=-1),
                      ValueError, "seed"),
    # the 4-bit weight and its state
    "state-missing": (lambda c: _op(c, state=None), TypeError, "state"),
    "state-absmax-short": (lambda c: _op(c, state=_state_with(c, absmax=c.state.absmax[:-1])),
                           ValueError, "absmax"),
    "state-bad-blocksize": (lambda c: _op(c, state=_state_with(c, blocksize=48)), ValueError,
                            "blocksize"),
    "state-bad-quant-type": (lambda c: _op(c, state=_state_with(c, quant_type="int4")),
                             ValueError, "quant_type"),
    "state-nested-without-offset": (lambda c: _op(c, state=_state_with(c, offset=None)),
                                    ValueError, "offset"),
    "packed-too-short": (lambda c: _op(c, packed=c.packed[:-1]), ValueError, "packed holds"),
    "packed-requires-grad": (lambda c: _op(c, packed=_packed_grad(c)), ValueError,
                             "packed must not require grad"),
    # ranks past the fused kernels' configs (the reference path would take them)
    "rank-257": (lambda c: _op(c, lora_A=c.lora_A.new_zeros(257, K),
                               lora_B=c.lora_B.new_zeros(N, 257)),
                 ValueError, "lora_A has rank 257"),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_lora_linear_4bit_rejects(case, name):
    call, error, needle = OP_CASES[name]
    with pytest.raises(error, match=needle):
        call(case)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a twice-longer
    tensor)."""
    wide = torch.zeros(t.numel() * 2, dtype=t.dtype, device=t.device)
    wide[::2] = t.reshape(-1)
    view = wide[::2].view(t.shape) if t.dim() == 1 else wide[::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("what", ["bias", "absmax", "state2-code"])
def test_non_contiguous_bias_and_state_give_the_contiguous_result(case, what):
    """The kernels index bias and the quantisation statistics flat: views with strides must
    give what their contiguous copies give, not values from between them."""
    want = _op(case)
    s = case.state
    if what == "bias":
        got = _op(case, bias=_strided(case.bias))
    elif what == "absmax":
        got = _op(case, state=_state_with(case, absmax=_strided(s.absmax)))
    else:
        state2 = QuantState(absmax=s.state2.absmax, code=_strided(s.state2.code),
                            blocksize=s.state2.blocksize, dtype=s.state2.dtype)
        got = _op(case, state=_state_with(case, state2=state2))
    assert torch.equal(got, want)


def test_empty_batch_gives_empty_output_and_zero_gradients(case):
    x = case.x[:0].clone().requires_grad_(True)
    a = case.lora_A.clone().requires_grad_(True)
    b = case.lora_B.clone().requires_grad_(True)
    y = fastlora.lora_linear_4bit(x, case.packed, case.state, a, b, case.scaling)
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_cpu_tensors_without_the_interpreter(case, monkeypatch):
    """auto falls back to the reference (a correct result); triton says why it cannot run.
    The case's tensors are moved to the CPU (on a GPU machine they live on the GPU)."""
    case = dataclasses.replace(case, x=case.x.cpu(), packed=case.packed.cpu(),
                               state=case.state.to("cpu"), lora_A=case.lora_A.cpu(),
                               lora_B=case.lora_B.cpu(), bias=case.bias.cpu())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    want = fastlora.reference.lora_linear_4bit(case.x, case.packed, case.state, case.lora_A,
                                               case.lora_B, case.scaling, case.bias)
    torch.testing.assert_close(_op(case), want, rtol=0, atol=0)
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _op(case)
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND"):
        _op(case)


# ----------------------------------------------------------------------------- modules, patch

def test_lora_module_rejects_bad_arguments():
    linear = nn.Linear(K, N)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear4bit.from_linear(nn.Conv1d(K, N, 1), r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear4bit.from_linear(linear, r=0, lora_alpha=8)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear4bit.from_linear(linear, r=4, lora_alpha=8, lora_dropout=1.5)
    with pytest.raises(ValueError, match="blocksize"):
        LoRALinear4bit.from_linear(linear, r=4, lora_alpha=8, blocksize=100)
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear4bit.from_bnb(linear, r=4, lora_alpha=8)


def test_lora_module_rejects_a_bnb_layer_without_quant_state():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(K, N)  # never moved to a device: not quantised yet
    with pytest.raises(ValueError, match="quant_state"):
        LoRALinear4bit.from_bnb(layer, r=4, lora_alpha=8)


def test_patch_and_unpatch_reject_non_modules_and_ignore_plain_models():
    with pytest.raises(TypeError, match="model"):
        fastlora.patch("not a model")
    with pytest.raises(TypeError, match="model"):
        fastlora.unpatch(None)
    plain = nn.Sequential(nn.Linear(8, 8))
    report = fastlora.patch(plain)
    assert report.patched == 0 and not report.skipped
    assert fastlora.unpatch(plain) == 0
