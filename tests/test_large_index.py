"""Large-index safety at run time (issue 7 item 4): the kernels read x and dy through row
and column offsets past 2^31 elements, without allocating such tensors.

x and dy are 3-row views whose row stride is 2^30 + K (so row 2 starts past element 2^31) into
a buffer of ~4 GB that is reserved but never touched except for the three rows: the OS only
backs the pages written. A kernel that formed `row * stride` in 32 bits would wrap to a
negative offset and read outside the buffer (a crash, or garbage). Each case runs in a child
process so such a crash fails the test instead of killing the test session; the result must
equal, bit for bit, the same computation on contiguous copies.

Static side: tests/test_compile.py checks on every shipped kernel's TTIR that each large
tensor is addressed through a 64-bit offset (fastlora.compilecheck.narrow_pointer_args).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from fastlora import backend

pytestmark = pytest.mark.skipif(
    not backend.interpreter_active(),
    reason="CPU-only: the 4 GB buffer is lazily backed by the OS only in host memory (kernels "
    "in the interpreter); on a GPU it would be allocated in full")

_PRELUDE = textwrap.dedent("""
    import torch
    from helpers import make_case
    from fastlora.launch.forward import lora_forward
    from fastlora.launch.backward import lora_backward

    def far_rows(t):
        # same values, rows 2^30 + cols apart in a lazily backed buffer
        rows, cols = t.shape
        stride = 2**30 + cols
        big = torch.empty(stride * (rows - 1) + cols, dtype=t.dtype)
        view = big.as_strided((rows, cols), (stride, 1))
        view.copy_(t)
        assert view.stride(0) * (rows - 1) >= 2**31
        return view

    def far_cols(t):
        # same values, columns ~2^31 / (cols - 1) apart: the last column starts past 2^31
        rows, cols = t.shape
        stride = 2**31 // (cols - 1) + rows
        big = torch.empty(stride * (cols - 1) + rows, dtype=t.dtype)
        view = big.as_strided((rows, cols), (1, stride))
        view.copy_(t)
        assert view.stride(1) * (cols - 1) >= 2**31
        return view

    c = make_case(3, 40, 64, 4, torch.bfloat16, "nf4", 64, True, True, 0.25)
    args = (c.packed, c.state, c.lora_A, c.lora_B, c.scaling)
""")

_FORWARD = """
    y, u = lora_forward({view}(c.x), *args, c.bias, c.dropout_p, c.seed, path="{path}")
    y0, u0 = lora_forward(c.x, *args, c.bias, c.dropout_p, c.seed, path="{path}")
    assert torch.equal(y, y0) and torch.equal(u, u0)
"""
_BACKWARD = """
    y0, u0 = lora_forward(c.x, *args, c.bias, c.dropout_p, c.seed)
    dy = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    far = lora_backward({view}(dy), {view}(c.x), u0, c.packed, c.state, c.lora_A, c.lora_B,
                        c.scaling, c.dropout_p, c.seed, True, True, True)
    near = lora_backward(dy, c.x, u0, c.packed, c.state, c.lora_A, c.lora_B, c.scaling,
                         c.dropout_p, c.seed, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(far, near))
"""
# Row views reach past 2^31 through row * stride; column-major views (far_cols) through
# column * stride, products that must be formed in 64 bits as well.
_CASES = {
    "forward-tiled": _FORWARD.format(view="far_rows", path="tiled"),
    "forward-small-m": _FORWARD.format(view="far_rows", path="small_m"),
    "backward": _BACKWARD.format(view="far_rows"),
    "forward-far-columns": _FORWARD.format(view="far_cols", path="tiled"),
    "backward-far-columns": _BACKWARD.format(view="far_cols"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_offsets_past_2_31_elements(case):
    code = _PRELUDE + textwrap.dedent(_CASES[case]) + "\nprint('OK')\n"
    tests_dir = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [tests_dir, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tests_dir, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (
        f"exit code {done.returncode} (negative: killed by a signal, e.g. an out-of-bounds "
        f"access)\n{done.stderr[-3000:]}")
