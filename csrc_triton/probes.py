"""Tiny kernels that check the toolchain itself rather than compute fastlora's math:
the interpreter's bf16 handling (fastlora/interpreter.py) and the Philox stream that dropout
masks come from (fastlora.reference reproduces it). Used by tests and `fastlora verify`;
not shipped as compute kernels, so they have no COMPILE_SPECS."""

import triton
import triton.language as tl


@triton.jit
def _bf16_dot_probe_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """c = a @ b: a, b bf16 [BLOCK, BLOCK] row-major, c fp32 [BLOCK, BLOCK]."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile))
    tl.store(c_ptr + tile, c)


@triton.jit
def _bf16_cast_probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = bf16(x): x fp32 [n], y bf16 [n] (round to nearest even on a GPU)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.bfloat16), mask=mask)


@triton.jit
def _philox_probe_kernel(out_ptr, seed, start, n, BLOCK: tl.constexpr):
    """out[w, i] = word w of tl.randint4x(seed, start + i) as int64 (uint32 values), out int64
    [4, n] (word 0 is tl.randint's)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1, w2, w3 = tl.randint4x(seed, start + offs.to(tl.int64))
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=mask)


@triton.jit
def _scalar_loop_probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] = sum(x[:n]) in a `range(0, n, BLOCK)` loop: the scalar argument n bounds a
    Python-level loop, which the interpreter converts with __index__ (fastlora/interpreter.py)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
