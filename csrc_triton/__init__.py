"""fastlora's Triton kernels (and nothing else: no torch.autograd, no nn.Module).

One file per op family:
    common.py    device helpers shared by every kernel: 4-bit tile decode, double-quant absmax
                 decode, the Philox dropout mask; and the CompileSpec record.
    dequant.py   packed 4-bit -> dense weight (the format's kernel).
    forward.py   U = dropout(x) @ A^T, and y = x @ deq(W)^T + s * U @ B^T + bias.
    small_m.py   the forward for M <= 16 (decode/generation): split-K GEMV-shaped.
    gemv.py      the forward for M <= 4 on the CUDA cores, U included: one launch.
    backward.py  dx, dU/dB, dA.
    group.py     U and dA for layers that share an input (q/k/v, gate/up), one pass over x.
    dora.py      QDoRA's additions: row norms of W + sBA from the packed weight, dropout,
                 the fp32 combine and the magnitude's column dot.
Each kernel file lists the configs it ships (per arch) as COMPILE_SPECS, which
fastlora.compile_report() compiles ahead of time for sm_80 / sm_90 (and the mma.sync GPUs that
run sm_80's lists: sm_86, sm_89, sm_120, with each file's SIBLING_FIXES).
"""

from .common import CompileSpec  # noqa: F401


def all_compile_specs():
    """Every CompileSpec shipped by the kernel files that exist."""
    import importlib

    specs = []
    for name in ("dequant", "forward", "small_m", "gemv", "backward", "group", "dora"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a kernel file not written yet
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        specs.extend(getattr(module, "COMPILE_SPECS", []))
    from .calibration import calibration_specs  # the plain GEMMs of the headline tiles

    return specs + calibration_specs(specs)
