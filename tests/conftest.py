"""Test setup: kernels run in Triton's CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported (DESIGN.md), hence at the very top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLORA_BACKEND", "auto")
