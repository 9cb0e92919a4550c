"""fastlora: Triton kernels for QLoRA training (bitsandbytes 4-bit base + LoRA).

Public contract (../shared/DESIGN.md):
    quantize_4bit, dequantize_4bit, QuantState        the bitsandbytes 4-bit format
    lora_linear_4bit                                  the fused, differentiable layer op
    prepare_lora_linear_4bit                          its no-grad M <= 16 call, prepared once
    lora_group_4bit, GroupMember                      layers that share an input, one op
    prepare_lora_group_4bit                           its no-grad M <= 16 call, prepared once
    dora_linear_4bit                                  a DoRA layer over a 4-bit base (QDoRA)
    prepare_dora_linear_4bit                          its no-grad M <= 16 call, prepared once
    mixed_linear_4bit, MixedAdapter                   several adapters in one batch, one per row
    prepare_mixed_linear_4bit                         its no-grad M <= 16 call, prepared once
    adapter_batch                                     train several PEFT adapters in one batch
    reference                                         the pure-PyTorch reference path
    LoRALinear4bit                                    drop-in module
    patch, unpatch, PatchReport                       PEFT + bitsandbytes models -> fused
    FastLoRACallback                                  the patch in any transformers Trainer (TRL)
    compile_report                                    sm_80 / sm_90 ahead-of-time compile check
    release_dequant_buffer, set_dequant_buffer_cap_mb the dequantize + cuBLAS path's shared
                                                      buffer (fastlora/launch/buffer.py)
Importing fastlora never touches a GPU.
"""

from __future__ import annotations

import importlib

from . import reference  # noqa: F401
from .ops import (GroupMember, MixedAdapter, dequantize_4bit, dora_linear_4bit, lora_group_4bit,
                  lora_linear_4bit, mixed_linear_4bit, prepare_dora_linear_4bit,
                  prepare_lora_group_4bit, prepare_lora_linear_4bit, prepare_mixed_linear_4bit)
from .quant import QuantState, quantize_4bit

__version__ = "0.1.0"

# heavier parts (transformers/peft, compilers) load on first use
_LAZY = {
    "LoRALinear4bit": ".modules",
    "patch": ".peft_patch",
    "unpatch": ".peft_patch",
    "PatchReport": ".peft_patch",
    "adapter_batch": ".peft_patch",
    "FastLoRACallback": ".callback",
    "compile_report": ".compilecheck",
    "release_dequant_buffer": ".launch.buffer",
    "set_dequant_buffer_cap_mb": ".launch.buffer",
}

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "lora_linear_4bit",
           "prepare_lora_linear_4bit", "prepare_lora_group_4bit",
           "lora_group_4bit", "dora_linear_4bit", "prepare_dora_linear_4bit",
           "mixed_linear_4bit", "prepare_mixed_linear_4bit", "GroupMember",
           "MixedAdapter", "reference", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")
