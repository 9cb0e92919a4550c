"""A tiny Llama QLoRA model for tests and demos, built in-process (no downloads).

    save_tiny_llama(path)                   random bf16 Llama (hidden 64, 2 layers), saved to path
    save_tiny(path, arch, vocab)            the same for "llama" or "qwen2" (grouped-query)
    load_4bit(path, quant_type=..., ...)    loaded by transformers with BitsAndBytesConfig, on CPU
    add_lora(model, ...)                    wrapped by PEFT LoRA on all seven projections, with
                                            random non-zero lora_B so the LoRA path counts
    float64_twin(path, peft_model)          its float64 truth: same dequantised weights, adapters
    token_batch(batch, seq)                 (input_ids, labels) for a causal-LM step
    lora_step(model) / logits(model)        one training step's logits, loss and LoRA grads /
                                            one no-grad forward's logits
    train_losses(model, steps)              per-step losses of AdamW on one repeated batch
    assert_close_fp32(got, want, what)      the fp32 closeness of fused vs PEFT runs

Sizes are multiples of 64 so that quantisation blocks never straddle rows (bitsandbytes 0.50's
CPU library mis-scales those, see tests/test_format.py) and the interpreter stays fast.
Models and batches go to DEVICE (the GPU when there is one, so the compiled kernels run there)
unless a `device` is given.
"""

from __future__ import annotations

import copy

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 256
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def save_tiny_llama(path, seed: int = 0) -> str:
    """A random Llama (hidden 64, intermediate 128, 2 layers, 4 heads, vocab 256) saved to `path`
    in bf16, so loading it in bf16, fp16 or fp32 quantises the very same values."""
    return save_tiny(path, "llama", seed=seed)


def save_tiny(path, arch: str = "llama", vocab: int = VOCAB, seed: int = 0, **config) -> str:
    """A random causal LM of `arch` ("llama": 4 heads, 4 KV heads; "qwen2": grouped-query
    attention, 4 heads over 2 KV heads, q/k/v with biases) at hidden 64, intermediate 128,
    2 layers, `vocab` tokens, saved to `path` in bf16. Extra keyword arguments go to the
    config (pad_token_id=..., ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM, 4),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM, 2)}
    if arch not in kinds:
        raise ValueError(f"arch must be one of {sorted(kinds)}, got {arch!r}")
    config_class, model_class, kv_heads = kinds[arch]
    cfg = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=128, **config)
    torch.manual_seed(seed)
    model_class(cfg).to(torch.bfloat16).save_pretrained(str(path))
    return str(path)


def load_4bit(path, quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: torch.dtype = torch.bfloat16,
              quant_storage: torch.dtype = torch.uint8, dtype: torch.dtype | None = None,
              device: str = DEVICE):
    """The saved model loaded in 4 bits on `device`; `dtype` (default: compute_dtype) is the
    dtype of the unquantised parts (embeddings, norms, lm_head).

    bitsandbytes' CPU inference repack (on CPUs with AVX512-BF16 it rewrites a weight into its
    own layout at the first eval forward without grad) is switched off, so that patched and
    unpatched runs read the same bytes; fastlora.patch skips repacked layers (test_patch.py)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_quant_storage=quant_storage)
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config,
                                                 device_map=device, dtype=dtype or compute_dtype)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def add_lora(model, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
             seed: int = 0, **config_kwargs):
    """`model` wrapped by PEFT LoRA on TARGETS; lora_B drawn N(0, 0.05^2) from `seed` (PEFT
    starts it at zero, which would hide the LoRA path and A's gradient). Extra keyword
    arguments go to LoraConfig (use_dora=True, lora_bias=True, ...)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=list(TARGETS), **config_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    randomize_lora_B(peft_model, seed)
    return peft_model


def randomize_lora_B(peft_model, seed: int = 0) -> None:
    """Every lora_B weight (of every adapter) drawn N(0, 0.05^2), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def float64_twin(path, peft_model):
    """The model of `peft_model` in float64, the truth a bf16/fp16/fp32 run is measured against
    (fastlora.numerics): the saved model loaded dense in float64, each 4-bit layer's weight
    replaced by its exact dequantised values (bitsandbytes' decoder in float32, exact in
    float64), and the same adapter values under a PEFT LoRA of the same config. bitsandbytes'
    own 4-bit forward cannot be the truth: with float64 inputs it returns wrong values."""
    import bitsandbytes.functional as bnbF
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora.bnb import Linear4bit
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64)
    prefix = "base_model.model."
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if isinstance(layer, Linear4bit):
                base = layer.get_base_layer()
                state = copy.copy(base.weight.quant_state)
                state.dtype = torch.float32
                weight = bnbF.dequantize_4bit(base.weight.data, state)
                dense.get_submodule(name[len(prefix):]).weight.copy_(weight.double())
    twin = get_peft_model(dense, copy.deepcopy(peft_model.peft_config["default"]))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(peft_model))
    return twin.double().to(peft_model.device)


def token_batch(batch: int = 2, seq: int = 16, seed: int = 0, device: str = DEVICE):
    """(input_ids, labels) [batch, seq] of random tokens; labels = input_ids (HF shifts them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)
    return ids, ids.clone()


def lora_step(model, seed: int = 0, **kwargs) -> dict:
    """Forward + backward on one batch: logits, loss and every LoRA gradient (cloned)."""
    ids, labels = token_batch(seed=seed)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


def train_losses(model, steps: int = 10, lr: float = 1e-2) -> list:
    """Per-step losses of AdamW (lr 1e-2) on one repeated batch, every trainable parameter."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, labels = token_batch()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, seed: int = 0, **kwargs) -> torch.Tensor:
    """The model's logits on one batch, without grad."""
    ids, _ = token_batch(seed=seed)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def assert_close_fp32(got, want, what: str) -> None:
    """fp32 compute: fused and PEFT differ only in summation order (~1e-6 relative)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")
