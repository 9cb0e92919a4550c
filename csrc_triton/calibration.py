"""The calibration row of the compile report (issue 28): a plain bf16 GEMM, Triton-tutorial
style (both operands loaded tile by tile, one tl.dot per trip), compiled with the tile, warps
and stages of each headline fused GEMM config. Its hot-loop ceiling is what a plain GEMM of that
tile can reach under the same model, so a fused row's ceiling over it is the share of a plain
GEMM's possible speed the fused loop keeps (fastlora.compilecheck.attach_calibration).

The plain GEMM computes the output tile in the fused kernel's own orientation: the forward
makes y^T tiles [BLOCK_N, BLOCK_M] over BLOCK_K, the dx GEMM dx^T tiles [BLOCK_K, BLOCK_M] over
BLOCK_N (so on sm_90 the wgmma instruction shapes match). Not a compute kernel: nothing
launches it; full tiles only (no masks), which is all the compiled loop needs."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import CompileSpec


@triton.jit
def _plain_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b: a bf16 [M, K] (K contiguous), b bf16 [K, N] (N contiguous), c bf16 [M, N];
    M, N, K multiples of the blocks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16))


PLAIN_KERNEL = "_plain_gemm_kernel"
# The fused GEMM kernels and their output tile in plain-GEMM terms: (rows, columns, reduction)
# from the config's blocks.
FUSED_TILES = {
    "_nf4_lora_fwd_kernel": lambda b: (b["BLOCK_N"], b["BLOCK_M"], b["BLOCK_K"]),
    "_nf4_lora_bwd_dx_kernel": lambda b: (b["BLOCK_K"], b["BLOCK_M"], b["BLOCK_N"]),
}


def plain_tile(spec) -> tuple | None:
    """(rows, columns, reduction, warps, stages) of the plain GEMM that calibrates a fused GEMM
    spec; None for other kernels and for fp32 'ieee' (FMA) configs."""
    tile = FUSED_TILES.get(spec.kernel)
    if tile is None or spec.fma_dot or not spec.trip_flops:
        return None
    return (*tile(spec.constexprs), spec.num_warps, spec.num_stages)


def plain_spec(tile: tuple, arch: str) -> CompileSpec:
    """The plain GEMM of `tile` (plain_tile's answer) for arch."""
    m, n, k, warps, stages = tile
    return CompileSpec(kernel=PLAIN_KERNEL, fn=_plain_gemm_kernel,
                       signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16",
                                  **{v: "i32" for v in ("M", "N", "K", "stride_am",
                                                         "stride_bk", "stride_cm")}},
                       constexprs={"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                       num_warps=warps, num_stages=stages, archs=(arch,),
                       aligned=("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am",
                                "stride_bk", "stride_cm"),
                       bounded_args=("a_ptr", "b_ptr", "c_ptr"), trip_flops=2 * m * n * k)


def calibration_specs(specs) -> list:
    """One plain GEMM spec per (tile, warps, stages, arch) of the headline fused GEMM specs."""
    wanted = sorted({(plain_tile(s), arch) for s in specs if s.ceiling_target > 0
                     and plain_tile(s) for arch in s.archs})
    return [plain_spec(tile, arch) for tile, arch in wanted]
