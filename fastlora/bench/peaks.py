"""Datasheet peaks per GPU: dense 16-bit tensor-core throughput and DRAM bandwidth.

tflops: dense BF16/FP16 tensor-core TFLOP/s with FP32 accumulation (datasheets quote 2x "with
sparsity"; we halve that). gbs: memory bandwidth in GB/s (10^9 bytes). These are the ceilings
the suite reports achieved throughput against, and the modelled (roofline) table divides by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Peak:
    name: str
    tflops: float   # dense bf16/fp16 tensor TFLOP/s
    gbs: float      # DRAM GB/s


# (substring of torch.cuda.get_device_name(), Peak), most specific first.
PEAKS: list[tuple[str, Peak]] = [
    # NVIDIA H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-
    # datasheet): SXM 1,979 TF bf16 with sparsity, 3.35 TB/s; PCIe 1,513 TF, 2.0 TB/s;
    # NVL 1,671 TF, 3.9 TB/s. SXM parts report as "NVIDIA H100 80GB HBM3".
    ("H100 PCIe", Peak("H100 PCIe", 756.5, 2000.0)),
    ("H100 NVL", Peak("H100 NVL", 835.5, 3900.0)),
    ("H100", Peak("H100 SXM", 989.4, 3350.0)),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 1,979 TF bf16 with sparsity,
    # 4.8 TB/s.
    ("H200", Peak("H200 SXM", 989.4, 4800.0)),
    # NVIDIA A100 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
    # nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): 312 TF bf16 dense; 80GB SXM
    # 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
    ("A100-SXM4-80GB", Peak("A100 SXM 80GB", 312.0, 2039.0)),
    ("A100 80GB PCIe", Peak("A100 PCIe 80GB", 312.0, 1935.0)),
    ("A100", Peak("A100 40GB", 312.0, 1555.0)),
    # NVIDIA L40S datasheet: 733 TF bf16 with sparsity, 864 GB/s.
    ("L40S", Peak("L40S", 366.5, 864.0)),
    # NVIDIA L4 datasheet (resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet):
    # 242 TF bf16 with sparsity, 300 GB/s.
    ("L4", Peak("L4", 121.0, 300.0)),
    # NVIDIA A10 datasheet: 125 TF bf16 dense (250 with sparsity), 600 GB/s.
    ("A10", Peak("A10", 125.0, 600.0)),
    # NVIDIA Ada GPU architecture whitepaper, table 1 (RTX 4090): 165.2 TF bf16 with FP32
    # accumulate (dense), 1,008 GB/s.
    ("RTX 4090", Peak("RTX 4090", 165.2, 1008.0)),
    # NVIDIA Ampere GA102 whitepaper, table (RTX 3090): 71 TF bf16 with FP32 accumulate
    # (dense), 936 GB/s.
    ("RTX 3090", Peak("RTX 3090", 71.0, 936.0)),
]

# the two GPUs of the modelled table printed when there is no GPU
MODELLED_GPUS = ("H100 SXM", "A100 SXM 80GB")


def peak_for(device_name: str) -> Optional[Peak]:
    """The peak of the GPU whose torch.cuda.get_device_name() is `device_name`, else None."""
    for key, peak in PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None


def peak_named(name: str) -> Peak:
    """A Peak by its table name ('H100 SXM', ...)."""
    for _, peak in PEAKS:
        if peak.name == name:
            return peak
    raise KeyError(name)
