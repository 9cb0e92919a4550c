"""Test setup: kernels run in Triton's CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported (DESIGN.md), hence at the very top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Forced, not defaulted: a FASTLORA_BACKEND=reference left in the shell would make every
# kernel-vs-reference test compare the reference with itself and pass without running a kernel.
os.environ["FASTLORA_BACKEND"] = "auto"
