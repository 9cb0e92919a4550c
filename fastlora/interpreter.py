"""The corrections fastlora applies to Triton's CPU interpreter (DESIGN.md).

The interpreter holds bfloat16 as uint16 bit patterns (triton-lang/triton#11584, #10945), so
  1. `tl.dot` on bf16 operands multiplies the bit patterns as integers, and
  2. the fp32 -> bf16 cast truncates instead of rounding to nearest even (on a GPU it rounds;
     about half of random fp32 values land one bf16 ulp away).
`apply()` patches exactly these two builder methods, only when the interpreter is active and
only on Triton versions known to have the defect. Elementwise math and `tl.sum` on bf16 are
also wrong in the interpreter; fastlora's kernels never do either (they upcast to fp32 first),
so that is not patched.

A second defect, on Triton 3.5 and 3.6 only: the interpreter turns a scalar kernel argument
into `int` with `int(array)` on a one-element array, which numpy >= 2.4 refuses ("only
0-dimensional arrays can be converted to Python scalars"), so every `range(0, K, BLOCK_K)`
loop fails. Triton 3.7 squeezes the array first; the correction does the same on 3.5/3.6.

tests/test_interpreter_fix.py shows the wrong result without each correction and the right
one with it.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from .backend import interpreter_active

# Triton releases checked to have the bf16 defect, and whose builder methods the correction
# fits (checked: 3.5.1, 3.6.0, 3.7.1, 3.8.0, 3.9.0). Other releases are left alone, with a
# warning, until someone runs tests/test_interpreter_fix.py there and extends the range.
AFFECTED_VERSIONS = ((3, 5), (3, 9))
# Releases whose interpreter converts a scalar with int() on a one-element array (checked:
# 3.5.1, 3.6.0; 3.7.0 fixed it).
INDEX_VERSIONS = ((3, 5), (3, 6))

_lock = threading.Lock()
_saved: dict = {}
_warned: list = []  # one warning per process


def _version() -> tuple:
    import triton

    parts = triton.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def affected() -> bool:
    lo, hi = AFFECTED_VERSIONS
    return lo <= _version() <= hi


def index_affected() -> bool:
    lo, hi = INDEX_VERSIONS
    return lo <= _version() <= hi


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bit patterns (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):
        rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def _warn_unchecked() -> None:
    with _lock:
        if _warned:
            return
        _warned.append(True)
    import triton

    warnings.warn(f"fastlora: the interpreter correction for bfloat16 is checked on Triton "
                  f"{AFFECTED_VERSIONS[0]}..{AFFECTED_VERSIONS[1]}, not {triton.__version__}: "
                  "bf16 results under TRITON_INTERPRET=1 may be wrong there (fp16/fp32 are "
                  "unaffected)", RuntimeWarning, stacklevel=3)


def apply() -> bool:
    """Install the correction if the interpreter is active on an affected Triton; idempotent.
    Returns whether the correction is in place."""
    if not interpreter_active():
        return False
    if not affected():
        _warn_unchecked()
        return False
    with _lock:
        if _saved:
            return True
        import triton.language as tl
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        orig_dot, orig_cast = builder.create_dot, builder.cast_impl

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
                a_data = _bf16_bits_to_fp32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data
                b_data = _bf16_bits_to_fp32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data
                out = np.matmul(a_data.astype(np.float32), b_data.astype(np.float32),
                                dtype=np.float32)
                return interp.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
            return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return interp.TensorHandle(_fp32_to_bf16_bits(src.data), dst_type.scalar)
            return orig_cast(self, src, dst_type)

        _saved.update(create_dot=orig_dot, cast_impl=orig_cast)
        builder.create_dot = create_dot
        builder.cast_impl = cast_impl  # create_fp_trunc & co. look cast_impl up per call
        if index_affected():
            _patch_scalar_index(interp)
    return True


def _scalar_index(self):
    return int(self.handle.data.squeeze())


def _patch_scalar_index(interp) -> None:
    """Wrap the interpreter's per-launch patching of tl.tensor so that `__index__` squeezes
    its one-element array before int() (Triton 3.5 sets the attribute directly, 3.6 through
    a scope that restores it after the launch; both look the function up per launch)."""
    orig_patch = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, *scope):
        orig_patch(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index

    _saved.update(patch_lang_tensor=orig_patch)
    interp._patch_lang_tensor = patch_lang_tensor


def remove() -> None:
    """Undo `apply()` (tests use it to show the defect)."""
    with _lock:
        if not _saved:
            return
        from triton.runtime import interpreter as interp

        interp.InterpreterBuilder.create_dot = _saved.pop("create_dot")
        interp.InterpreterBuilder.cast_impl = _saved.pop("cast_impl")
        if "patch_lang_tensor" in _saved:
            interp._patch_lang_tensor = _saved.pop("patch_lang_tensor")


def active() -> bool:
    return bool(_saved)
