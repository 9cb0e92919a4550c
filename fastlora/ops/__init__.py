"""The ops: one module per op family (DESIGN.md "Layers"), each a torch.library custom op with
its autograd and the backend choice (kernels or fastlora.reference).

    linear.py    lora_linear_4bit: one LoRA layer over a 4-bit base weight
    group.py     lora_group_4bit: several LoRA layers that read the same input
    dora.py      dora_linear_4bit: a DoRA layer over a 4-bit base weight (QDoRA)
    mixed.py     mixed_linear_4bit: several adapters over one 4-bit base, one per row
    dequant.py   dequantize_4bit: the packed weight decoded to a dense tensor
"""

from .dequant import dequantize_4bit
from .dora import dora_linear_4bit, prepare_dora_linear_4bit
from .group import GroupMember, lora_group_4bit, prepare_lora_group_4bit
from .linear import lora_linear_4bit, prepare_lora_linear_4bit
from .mixed import MixedAdapter, mixed_linear_4bit, prepare_mixed_linear_4bit

__all__ = ["lora_linear_4bit", "prepare_lora_linear_4bit", "lora_group_4bit",
           "prepare_lora_group_4bit", "dora_linear_4bit", "prepare_dora_linear_4bit",
           "mixed_linear_4bit", "prepare_mixed_linear_4bit", "GroupMember",
           "MixedAdapter", "dequantize_4bit"]
