"""The modelled tables' shared pieces (fastlora.bench.suite's per-layer table and the modes
with their own modules): the hot-loop ceilings of the GPUs modelled, and the note that says
what the modelled numbers are."""

from __future__ import annotations

import torch

from . import model


def modelled_ceilings(opts, rows=None) -> tuple[dict, dict]:
    """({GPU name: {kernel: hot-loop ceiling}}, {GPU name: why its ceilings are missing}) for
    opts.gpus at opts' dtype class: from compile-report `rows` when given, else compiled
    (model.kernel_ceilings: only the specs it needs, once per process). A GPU whose compile
    fails gets no ceilings (its fastlora kernels are unmodelled) and the reason."""
    klass = model.dtype_class(torch.finfo(opts.torch_dtype).bits // 8)
    ceilings, failed = {}, {}
    for gpu in opts.gpus:
        arch = model.GPU_ARCHS[gpu]
        try:
            ceilings[gpu] = model.kernel_ceilings(arch, klass, rows)
        except Exception as exc:  # no ptxas / cuobjdump here, a kernel that fails to compile
            ceilings[gpu], failed[gpu] = {}, f"{type(exc).__name__}: {str(exc)[-300:]}"
    return ceilings, failed


def modelled_note(opts, ceilings: dict, failed: dict) -> str:
    """The modelled table's header: what the numbers are and the ceilings they use."""
    klass = model.dtype_class(torch.finfo(opts.torch_dtype).bits // 8)
    lines = [
        "MODELLED, not measured. Time = sum over each provider's kernel launches of "
        "max(FLOPs / FLOP/s, minimum bytes / B/s) + "
        f"{model.LAUNCH_OVERHEAD_S * 1e6:g} us launch overhead each (assumed), over datasheet "
        "peaks (fastlora.bench.model, the GPU table fastlora/gpus.py).",
        "- fastlora: each kernel at its compiled hot-loop ceiling (fastlora compile-report: "
        "the best share of tensor-core peak, for the GEMM kernels, or of HBM bandwidth, for "
        "the memory-bound ones, that its SASS main loop allows; headline configs preferred). "
        "A first-order static upper bound, so these fastlora times are optimistic.",
        f"- peers ({', '.join(p for p in model.PROVIDER_STEPS if p != 'fastlora')}): ideal "
        f"roofline at assumed cuBLAS-like efficiencies: GEMMs "
        f"{model.PEER_GEMM_EFFICIENCY:.2f} of tensor-core peak, memory-bound kernels "
        f"(dequantize, elementwise) {model.PEER_BANDWIDTH_EFFICIENCY:.2f} of bandwidth "
        "(assumptions, not measurements)."]
    from ..compilecheck import ARCHS

    for gpu in opts.gpus:
        arch = model.GPU_ARCHS[gpu]
        text = model.describe_ceilings(ceilings.get(gpu, {}))
        if gpu in failed:
            text += f" (compiling failed: {failed[gpu]})"
        elif arch not in ARCHS:
            text += f" (the compile check covers {', '.join(ARCHS)}, not {arch})"
        lines.append(f"- ceilings used for {gpu} ({arch}, {klass}): {text}")
    return "\n".join(lines)
