"""The GPU table: every figure fastlora models a GPU with, in one place (sources per row).

Read by the compile check's hot-loop model (the per-SM, per-clock figures of each arch's
REFERENCE_GPU), by `fastlora bench` (the datasheet peaks that measured rows are a share of, and
the GPUs of the modelled tables: `--gpu NAME`) and by the modelled fused-vs-dequantize pick
(fastlora.bench.model.expected_pick). No other module holds a peak figure.

Per row:
    arch                    the compile target ('sm_80', 'sm_86', 'sm_89', 'sm_90', 'sm_100',
                            'sm_120')
    sms                     streaming multiprocessors enabled on the product
    boost_clock_mhz         the clock the datasheet's dense tensor TFLOP/s is quoted at: the
                            boost clock, or where that figure implies a lower clock than the
                            marketing boost (H100, H200, B200) the implied one (said per row)
    mma_flops_per_clock_sm  dense BF16/FP16 tensor FLOP per clock per SM with FP32
                            accumulation (datasheets quote 2x "with sparsity"; GeForce parts run
                            FP32 accumulation at half the rate of their datacenter / workstation
                            siblings of the same die)
    dram_gbs                DRAM bandwidth, GB/s (10^9 B/s)
    smem_per_block_kib      the most shared memory one block can use (opt-in), KiB
    smem_per_sm_kib         shared memory per SM, KiB
    registers_per_sm        32-bit registers per SM
    match                   substrings of torch.cuda.get_device_name() naming the product
and derived: tflops = sms x mma_flops_per_clock_sm x clock (each row reproduces its datasheet's
dense figure within 1%: tests/test_gpus.py) and hbm_bytes_per_clock_sm.

Shared memory and registers are compute-capability facts: NVIDIA CUDA C++ Programming Guide,
"Technical Specifications per Compute Capability" (cc 8.0: 164 KB per SM, 163 KB per block;
8.6, 8.9 and 12.0: 100 / 99 KB; 9.0 and 10.0: 228 / 227 KB; 64K 32-bit registers per SM on
all of them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

REGISTERS = 65536  # 64K 32-bit registers per SM: every arch below (CUDA programming guide)
# (smem per block, smem per SM) in KiB per arch (CUDA programming guide, see the docstring)
_SMEM = {"sm_80": (163, 164), "sm_86": (99, 100), "sm_89": (99, 100), "sm_90": (227, 228),
         "sm_100": (227, 228), "sm_120": (99, 100)}


@dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    sms: int
    boost_clock_mhz: int
    mma_flops_per_clock_sm: int
    dram_gbs: float
    smem_per_block_kib: int
    smem_per_sm_kib: int
    registers_per_sm: int
    match: tuple = ()

    @property
    def boost_clock_ghz(self) -> float:
        return self.boost_clock_mhz / 1e3

    @property
    def clock_hz(self) -> float:
        return self.boost_clock_mhz * 1e6

    @property
    def tflops(self) -> float:
        """Dense BF16/FP16 tensor TFLOP/s with FP32 accumulation."""
        return self.sms * self.mma_flops_per_clock_sm * self.clock_hz / 1e12

    @property
    def hbm_bytes_per_clock_sm(self) -> float:
        """DRAM bytes per SM and clock at the datasheet bandwidth."""
        return self.dram_gbs * 1e9 / self.sms / self.clock_hz


def _gpu(name, arch, sms, mhz, flops, gbs, match) -> GPU:
    block, sm = _SMEM[arch]
    return GPU(name, arch, sms, mhz, flops, gbs, block, sm, REGISTERS, tuple(match))


GPUS: tuple = (
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): 312 TF BF16
    # dense (624 with sparsity) on every A100; 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s,
    # 40GB 1,555 GB/s. NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs, boost
    # 1410 MHz; 108 x 2048 x 1.41 GHz = 311.9 TF.
    _gpu("A100 SXM 80GB", "sm_80", 108, 1410, 2048, 2039, ("A100-SXM4-80GB", "A100-SXM-80GB")),
    _gpu("A100 PCIe 80GB", "sm_80", 108, 1410, 2048, 1935, ("A100 80GB PCIe",)),
    _gpu("A100 40GB", "sm_80", 108, 1410, 2048, 1555, ("A100",)),
    # NVIDIA H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-
    # datasheet): BF16 with sparsity SXM 1,979 TF, 3.35 TB/s; PCIe 1,513 TF, 2 TB/s; NVL
    # 1,671 TF, 3.9 TB/s. NVIDIA H100 Tensor Core GPU Architecture whitepaper: 132 SMs (SXM5),
    # 114 (PCIe). The dense figures imply the clock: SXM 989.4 TF = 132 x 4096 x 1.83 GHz
    # (marketing max boost 1.98 GHz), PCIe 756.5 TF = 114 x 4096 x 1.62 GHz (boost 1.755 GHz),
    # NVL 835.5 TF = 132 x 4096 x 1.545 GHz (132 SMs from third-party spec tables; its
    # marketing boost not confirmed here). SXM parts report as "NVIDIA H100 80GB HBM3".
    _gpu("H100 SXM", "sm_90", 132, 1830, 4096, 3350, ("H100 80GB HBM3", "H100 SXM", "H100")),
    _gpu("H100 PCIe", "sm_90", 114, 1620, 4096, 2000, ("H100 PCIe",)),
    _gpu("H100 NVL", "sm_90", 132, 1545, 4096, 3900, ("H100 NVL",)),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 with sparsity SXM 1,979
    # TF, NVL 1,671 TF; 4.8 TB/s both. The same GH100 configuration as H100 SXM / NVL (132 SMs:
    # not on the datasheet; the equal TF figures imply the same SMs x clock).
    _gpu("H200 SXM", "sm_90", 132, 1830, 4096, 4800, ("H200",)),
    _gpu("H200 NVL", "sm_90", 132, 1545, 4096, 4800, ("H200 NVL",)),
    # NVIDIA A10 datasheet: BF16 125 TF dense (250 with sparsity), 600 GB/s. GA102 with 72 SMs,
    # boost 1695 MHz (not on the datasheet: third-party spec tables; 72 x 1024 x 1.695 GHz
    # = 125.0 TF reproduces it).
    _gpu("A10", "sm_86", 72, 1695, 1024, 600, ("A10",)),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090: 82 SMs, boost
    # 1695 MHz, 936 GB/s, peak FP16/BF16 tensor TFLOPS with FP32 accumulate 71 / 142 (dense /
    # sparse): 512 per clock per SM, half the A10's (GA102 in a datacenter part).
    _gpu("RTX 3090", "sm_86", 82, 1695, 512, 936, ("RTX 3090",)),
    # NVIDIA L4 datasheet (resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet):
    # BF16 242 TF with sparsity, 300 GB/s. AD104 with 58 SMs (7,424 CUDA cores / 128), boost
    # 2040 MHz (third-party spec tables); 58 x 1024 x 2.04 GHz = 121.2 TF.
    _gpu("L4", "sm_89", 58, 2040, 1024, 300, ("L4",)),
    # NVIDIA L40S datasheet: BF16 733 TF with sparsity, 864 GB/s; 142 SMs (18,176 CUDA cores),
    # boost 2520 MHz: 142 x 1024 x 2.52 GHz = 366.4 TF = 733 / 2. (Its dense column says
    # 362.05 TF, which implies 2.49 GHz, the L40's boost clock.)
    _gpu("L40S", "sm_89", 142, 2520, 1024, 864, ("L40S",)),
    # NVIDIA Ada GPU Architecture whitepaper, appendix (GeForce RTX 4090): 128 SMs, boost
    # 2520 MHz, 1,008 GB/s, FP16/BF16 tensor with FP32 accumulate 165.2 TF dense: 512 per
    # clock per SM, half the L40S's (AD102 in a datacenter part).
    _gpu("RTX 4090", "sm_89", 128, 2520, 512, 1008, ("RTX 4090",)),
    # NVIDIA HGX B200 / DGX B200 specifications: 8 GPUs give FP16/BF16 36 PFLOPS with sparsity
    # (2.25 PF dense each) and 64 TB/s of HBM3e (8 TB/s each; third-party tables list 7.7 TB/s
    # for some B200s). 148 SMs (two dies of 74; from third-party tables and microbenchmark
    # write-ups, not an NVIDIA datasheet). sm_100 runs twice sm_90's tensor rate per SM:
    # 2.25 PF = 148 x 8192 x 1.856 GHz, the clock the figure implies (third-party tables give a
    # boost clock of ~1.97 GHz; not confirmed here).
    _gpu("B200", "sm_100", 148, 1856, 8192, 8000, ("B200",)),
    # NVIDIA RTX Blackwell GPU Architecture whitepaper, GeForce RTX 5090: 170 SMs, boost
    # 2407 MHz, 1,792 GB/s (28 Gbps x 512 bits); FP16 tensor 838 TF with sparsity at FP16
    # accumulate, so 419 dense, and 209.5 TF with FP32 accumulate: GeForce's half rate (512 per
    # clock per SM). That half rate on sm_120 is the whitepaper's GeForce rule, seen also in a
    # third-party measurement on an RTX 5060 Ti; not confirmed here from NVIDIA's own table.
    _gpu("RTX 5090", "sm_120", 170, 2407, 512, 1792, ("RTX 5090",)),
    # NVIDIA RTX PRO 6000 Blackwell Workstation Edition datasheet: 24,064 CUDA cores (188 SMs),
    # 1,792 GB/s, 4,000 AI TOPS (FP4 with sparsity: 500 TF dense at FP16). Boost 2617 MHz
    # (third-party spec tables). A workstation part, so FP32 accumulation at the full rate
    # (1024 per clock per SM, as the RTX 6000 Ada has): 188 x 1024 x 2.617 GHz = 503.8 TF, the
    # figure third-party tables give; not confirmed here from an NVIDIA document. The Max-Q and
    # Server editions run other clocks: not matched.
    _gpu("RTX PRO 6000", "sm_120", 188, 2617, 1024, 1792, ("RTX PRO 6000 Blackwell Workstation",)),
)

# the GPU whose per-SM, per-clock figures the compile check's hot-loop model uses for an arch
# (fastlora.compilecheck): the datacenter (full-rate) part of each
REFERENCE_GPU = {"sm_80": "A100 SXM 80GB", "sm_86": "A10", "sm_89": "L40S", "sm_90": "H100 SXM",
                 "sm_100": "B200", "sm_120": "RTX PRO 6000"}

# compile target -> the per-arch config lists it runs (csrc_triton keys them by 'sm_90', wgmma,
# and 'sm_80', mma.sync: every other arch runs the mma.sync lists, its own shared memory
# permitting: fastlora.compilecheck checks each list's configs fit the arch's smem_per_block)
CONFIG_FAMILY = {"sm_80": "sm_80", "sm_86": "sm_80", "sm_89": "sm_80", "sm_90": "sm_90",
                 "sm_100": "sm_80", "sm_120": "sm_80"}
# compute capability -> compile target, where the capability is its own target in the table;
# others by major (capability_arch)
_CAPABILITY = {(8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90",
               (10, 0): "sm_100", (12, 0): "sm_120"}


def capability_arch(major: int, minor: int) -> str:
    """The table's compile target for a compute capability: itself where listed (8.0, 8.6,
    8.9, 9.0, 10.0, 12.0), else by major: 8.x 'sm_86' (the smaller shared memory of 8.x: an
    8.7 Orin runs configs that fit 99 KB), 9.x 'sm_90', 10.x / 11.x 'sm_100', 12.x and later
    'sm_120'. ValueError below 8.0 (no bf16 tensor cores)."""
    if (major, minor) in _CAPABILITY:
        return _CAPABILITY[(major, minor)]
    if major < 8:
        raise ValueError(f"compute capability {major}.{minor} is older than 8.0: fastlora's "
                         "kernels need sm_80 or newer")
    return {8: "sm_86", 9: "sm_90", 10: "sm_100", 11: "sm_100"}.get(major, "sm_120")


def smem_per_block_bytes(arch: str) -> int:
    """The most shared memory one block may use on `arch` (opt-in), bytes."""
    if arch not in _SMEM:
        raise KeyError(f"no shared-memory figure for arch {arch!r}; known: {', '.join(_SMEM)}")
    return _SMEM[arch][0] * 1024


_BY_NAME = {gpu.name.lower(): gpu for gpu in GPUS}
# (pattern, GPU), longest substring first: "H100 PCIe" before "H100", "A100 80GB PCIe" before
# "A100". A substring matches only as whole words: "A10" is not in "A100" nor "A10G", "L4" not
# in "L40S", "B200" not in "GB200".
_MATCHES = sorted(((re.compile(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", re.I),
                    len(key), gpu) for gpu in GPUS for key in gpu.match),
                  key=lambda item: -item[1])


def names() -> list[str]:
    return [gpu.name for gpu in GPUS]


def gpu_named(name: str) -> GPU:
    """The row named `name` ('H100 SXM'; any case). KeyError naming the known ones."""
    found = _BY_NAME.get(name.strip().lower())
    if found is None:
        raise KeyError(f"unknown GPU {name!r}; known GPUs: {', '.join(names())}")
    return found


def gpu_for_device(device_name: str) -> Optional[GPU]:
    """The row of the GPU whose torch.cuda.get_device_name() is `device_name` (most specific
    match first), None when the table does not know it."""
    for pattern, _, gpu in _MATCHES:
        if pattern.search(device_name):
            return gpu
    return None


def reference(arch: str) -> GPU:
    """The GPU the hot-loop model's per-clock figures for `arch` come from (REFERENCE_GPU)."""
    if arch not in REFERENCE_GPU:
        raise KeyError(f"no reference GPU for arch {arch!r}; known: {', '.join(REFERENCE_GPU)}")
    return gpu_named(REFERENCE_GPU[arch])


def current(arch: str = "sm_90") -> GPU:
    """The GPU to model here: this machine's CUDA device's row when the table knows it, else
    reference(arch). Reads the device (never at import)."""
    import torch

    if torch.cuda.is_available():
        found = gpu_for_device(torch.cuda.get_device_name())
        if found is not None:
            return found
    return reference(arch)
