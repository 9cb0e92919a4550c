"""fastlora.LoRALinear4bit: construction (from_linear quantises like bitsandbytes, from_bnb
shares the bnb layer), PEFT's init and scaling, forward/backward within the numerics bound of
the float64 reference, dropout and eval, state-dict interchange with PEFT, bad input.

Numerical checks follow fastlora.numerics: err vs the float64 reference <= 2 x the error of
plain PyTorch in the same dtype (fastlora.reference with the adapter cast to that dtype, which is
what the module computes) + one ulp. Data are O(1) so the atol is one ulp at the result's scale.
"""

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora import reference
from fastlora.numerics import compare
from fastlora.quant import QuantState
from helpers import DEVICE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IN, OUT, R, ALPHA = 64, 128, 8, 16


def _linear(bias: bool = True, dtype=torch.float32, seed: int = 0,
            device: str = DEVICE) -> nn.Linear:
    """A dense layer on `device` (its initial values drawn on the CPU: the same on every
    machine)."""
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias).to(device, dtype)


def _randomize_B(module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) / R**0.5)


def _state(module) -> QuantState:
    return QuantState.from_bnb(module.base_layer.weight.quant_state)


def _assert_ok(comparisons) -> None:
    bad = [c.message() for c in comparisons if not c.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("quant_type,double_quant,storage",
                         [("nf4", True, torch.uint8), ("fp4", False, torch.uint8),
                          ("nf4", True, torch.bfloat16)], ids=["nf4-dq", "fp4", "nf4-storage-bf16"])
def test_from_linear_quantises_like_bitsandbytes(quant_type, double_quant, storage):
    # on the CPU on every machine: the format is pinned to bitsandbytes' CPU quantiser
    # (test_format.py); its CUDA quantiser is another implementation, not the definition
    linear = _linear(dtype=torch.bfloat16, device="cpu")
    module = fastlora.LoRALinear4bit.from_linear(linear, R, ALPHA, quant_type=quant_type,
                                                 double_quant=double_quant,
                                                 quant_storage=storage)
    packed, state = bnbF.quantize_4bit(linear.weight.detach(), compress_statistics=double_quant,
                                       quant_type=quant_type, quant_storage=storage)
    base = module.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == storage
    assert torch.equal(base.weight.data.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(base.weight.quant_state.absmax, state.absmax)
    assert torch.equal(base.bias, linear.bias) and not base.bias.requires_grad
    # the bnb layer it builds is a working bitsandbytes layer: its own forward reads our bytes
    x = torch.randn(4, IN).to(torch.bfloat16)
    want = nn.functional.linear(x, bnbF.dequantize_4bit(packed, state), linear.bias)
    torch.testing.assert_close(base(x), want.detach())


@pytest.mark.quick
def test_init_and_scaling_like_peft():
    module = fastlora.LoRALinear4bit.from_linear(_linear(), R, ALPHA)
    assert module.lora_A.weight.shape == (R, IN) and module.lora_B.weight.shape == (OUT, R)
    assert module.lora_A.weight.dtype == module.lora_B.weight.dtype == torch.float32
    assert torch.count_nonzero(module.lora_B.weight) == 0
    # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(IN)
    assert 0.9 * bound < module.lora_A.weight.abs().max() <= bound
    assert module.scaling == ALPHA / R
    rs = fastlora.LoRALinear4bit.from_linear(_linear(), R, ALPHA, use_rslora=True)
    assert rs.scaling == ALPHA / math.sqrt(R)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    # B = 0: the layer starts equal to its 4-bit base
    x = torch.randn(2, 5, IN).to(DEVICE)
    torch.testing.assert_close(module(x), module.base_layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias,dropout_p", [(False, 0.0), (True, 0.25)],
                         ids=["nobias-nodrop", "bias-drop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_forward_backward_within_bound(dtype, bias, dropout_p):
    dt = DTYPES[dtype]
    module = fastlora.LoRALinear4bit.from_linear(_linear(bias, dt), R, ALPHA,
                                                 lora_dropout=dropout_p, compute_dtype=dt)
    _randomize_B(module)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 16, IN, generator=g).to(DEVICE)
    dy = torch.randn(2, 16, OUT, generator=g).to(DEVICE)
    packed, state = module.base_layer.weight.data, _state(module)

    def run(fn, dtype):
        x = x0.to(dtype).requires_grad_()
        a = module.lora_A.weight.detach().to(dtype).requires_grad_()
        b = module.lora_B.weight.detach().to(dtype).requires_grad_()
        bvec = module.base_layer.bias.detach().to(dtype) if bias else None
        torch.manual_seed(3)  # the dropout seed is drawn from torch's generator
        y = fn(x, packed, state, a, b, module.scaling, bvec, dropout_p=dropout_p,
               training=True)
        y.backward(dy.to(dtype))
        return y.detach(), x.grad, a.grad.float(), b.grad.float()

    truth = run(reference.lora_linear_4bit, torch.float64)
    baseline = run(reference.lora_linear_4bit, dt)
    x = x0.to(dt).requires_grad_()
    torch.manual_seed(3)
    y = module(x)
    y.backward(dy.to(dt))
    got = (y.detach(), x.grad, module.lora_A.weight.grad, module.lora_B.weight.grad)
    assert module.lora_A.weight.grad.dtype == torch.float32  # grads land in the params' dtype
    _assert_ok([compare(name, o, t, b, dt) for name, o, t, b
                in zip(("y", "dx", "dA", "dB"), got, truth, baseline)])


def test_eval_turns_dropout_off():
    module = fastlora.LoRALinear4bit.from_linear(_linear(), R, ALPHA, lora_dropout=0.5)
    _randomize_B(module)
    x = torch.randn(32, IN).to(DEVICE)
    no_drop = reference.lora_linear_4bit(x, module.base_layer.weight.data, _state(module),
                                         module.lora_A.weight, module.lora_B.weight,
                                         module.scaling, module.base_layer.bias)
    with torch.no_grad():
        train_out = module(x)
        module.eval()
        eval_out = module(x)
    torch.testing.assert_close(eval_out, no_drop, rtol=1e-5, atol=1e-5)
    assert (train_out - no_drop).abs().max() > 0.1, "dropout 0.5 changed nothing in train mode"


def _bnb_layer(bias: bool = True) -> bnb.nn.Linear4bit:
    """A Linear4bit quantised by bitsandbytes itself (moving it to DEVICE quantises it),
    with bnb's CPU inference repack off (as in tiny_models.load_4bit): in eval mode it would
    switch to another kernel and layout."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(IN, OUT, bias=bias, compute_dtype=torch.float32,
                              quant_type="nf4").to(DEVICE)
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.quick
def test_from_bnb_shares_the_layer():
    layer = _bnb_layer()
    pointer = layer.weight.data_ptr()
    module = fastlora.LoRALinear4bit.from_bnb(layer, R, ALPHA)
    assert module.base_layer is layer and module.base_layer.weight.data_ptr() == pointer
    assert not any(p.requires_grad for p in layer.parameters())
    _randomize_B(module)
    x = torch.randn(16, IN).to(DEVICE)
    want = layer(x) + module.scaling * (x @ module.lora_A.weight.t()) @ module.lora_B.weight.t()
    torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    """A one-layer model that PEFT wraps like a 4-bit transformers model."""
    is_loaded_in_4bit = True

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.quick
def test_adapter_files_interchange_with_peft(tmp_path):
    """An adapter saved by PEFT loads into LoRALinear4bit, and one written from
    LoRALinear4bit's state dict loads into PEFT: same keys, same shapes, same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    prefix = "base_model.model.proj."
    layer = _bnb_layer()
    peft_model = get_peft_model(_Net(layer), LoraConfig(r=R, lora_alpha=ALPHA,
                                                        target_modules=["proj"]))
    with torch.no_grad():
        peft_model.base_model.model.proj.lora_B["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")

    # PEFT -> fastlora
    ours = fastlora.LoRALinear4bit.from_bnb(layer, R, ALPHA)
    result = ours.load_state_dict({k[len(prefix):]: v for k, v in saved.items()}, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("base_layer.") for k in result.missing_keys), result.missing_keys
    x = torch.randn(16, IN).to(DEVICE)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)

    # fastlora -> PEFT
    _randomize_B(ours, seed=7)
    lora = {prefix + k: v.contiguous() for k, v in ours.state_dict().items()
            if k.startswith("lora_")}
    assert {k: v.shape for k, v in lora.items()} == {k: v.shape for k, v in saved.items()}
    save_file(lora, tmp_path / "peft" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(_Net(_bnb_layer()), tmp_path / "peft")
    peft_layer = loaded.base_model.model.proj
    assert torch.equal(peft_layer.lora_B["default"].weight, ours.lora_B.weight)
    assert torch.equal(peft_layer.lora_A["default"].weight, ours.lora_A.weight)
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.quick
def test_bad_input():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        fastlora.LoRALinear4bit.from_linear(nn.Conv1d(4, 4, 1), R, ALPHA)
    with pytest.raises(TypeError, match="base_layer must be a bitsandbytes.nn.Linear4bit"):
        fastlora.LoRALinear4bit.from_bnb(_linear(), R, ALPHA)
    with pytest.raises(ValueError, match="no quant_state"):
        fastlora.LoRALinear4bit.from_bnb(bnb.nn.Linear4bit(IN, OUT), R, ALPHA)
    with pytest.raises(ValueError, match="r must be a positive int"):
        fastlora.LoRALinear4bit.from_linear(_linear(), 0, ALPHA)
    with pytest.raises(ValueError, match="lora_dropout"):
        fastlora.LoRALinear4bit.from_linear(_linear(), R, ALPHA, lora_dropout=1.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        fastlora.LoRALinear4bit.from_linear(_linear(), R, ALPHA, compute_dtype=torch.float64)
    layer = _bnb_layer()
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        fastlora.LoRALinear4bit.from_bnb(layer, R, ALPHA)
    layer = _bnb_layer()
    layer.weight.quant_state.shape = torch.Size((OUT, IN + 64))
    with pytest.raises(ValueError, match="quant_state"):
        fastlora.LoRALinear4bit.from_bnb(layer, R, ALPHA)
