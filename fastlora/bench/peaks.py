"""Datasheet peaks per GPU for the suite: a view of the GPU table, fastlora/gpus.py (figures
and their sources are there, and nowhere else).

tflops: dense BF16/FP16 tensor-core TFLOP/s with FP32 accumulation; gbs: DRAM GB/s (10^9
bytes). These are the ceilings the suite reports achieved throughput against, and the modelled
(roofline) tables divide by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..gpus import GPU, gpu_for_device, gpu_named


@dataclass(frozen=True)
class Peak:
    name: str
    tflops: float   # dense bf16/fp16 tensor TFLOP/s
    gbs: float      # DRAM GB/s


# the GPUs of the modelled tables when `fastlora bench --gpu` names none
MODELLED_GPUS = ("H100 SXM", "A100 SXM 80GB")


def peak_of(gpu: GPU) -> Peak:
    return Peak(gpu.name, gpu.tflops, gpu.dram_gbs)


def peak_for(device_name: str) -> Optional[Peak]:
    """The peak of the GPU whose torch.cuda.get_device_name() is `device_name`, else None."""
    gpu = gpu_for_device(device_name)
    return None if gpu is None else peak_of(gpu)


def peak_named(name: str) -> Peak:
    """A Peak by its table name ('H100 SXM', ...); KeyError naming the known ones."""
    return peak_of(gpu_named(name))
