"""The interpreter correction (fastlora/interpreter.py): wrong without it, right with it."""

import pytest
import torch
import triton

from fastlora import backend, interpreter

pytestmark = [pytest.mark.skipif(
    not backend.interpreter_active(),
    reason="CPU-only: the corrections only exist for Triton's CPU interpreter"),
    pytest.mark.quick]  # the whole module is in the quick tier


def _dot(a, b):
    from csrc_triton.probes import _bf16_dot_probe_kernel

    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    _bf16_dot_probe_kernel[(1,)](a, b, c, BLOCK=a.shape[0])
    return c


def _cast(x):
    from csrc_triton.probes import _bf16_cast_probe_kernel

    y = torch.empty_like(x, dtype=torch.bfloat16)
    _bf16_cast_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


@pytest.fixture
def without_correction():
    interpreter.remove()
    try:
        yield
    finally:
        interpreter.apply()


def _operands():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    return a, b, a.float() @ b.float()


def _cast_input():
    return torch.randn(100_000, generator=torch.Generator().manual_seed(1))


def test_bf16_dot_is_wrong_without_correction(without_correction):
    a, b, want = _operands()
    err = (_dot(a, b) - want).abs().max().item()
    assert err > 1e3, f"expected the interpreter defect (integer product of bit patterns), err {err}"


def test_bf16_cast_truncates_without_correction(without_correction):
    x = _cast_input()
    wrong = (_cast(x) != x.to(torch.bfloat16)).float().mean().item()
    assert 0.4 < wrong < 0.6, f"expected ~half of the values one ulp off, got {wrong:.3f}"


def test_bf16_dot_is_right_with_correction():
    assert interpreter.apply()
    a, b, want = _operands()
    torch.testing.assert_close(_dot(a, b), want, rtol=1e-6, atol=1e-5)


def test_bf16_cast_rounds_to_nearest_even_with_correction():
    assert interpreter.apply()
    x = torch.cat([_cast_input(), torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0,
                                                -0.0, 3.0e38, 1e-40])])
    got, want = _cast(x), x.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {x.numel()} casts differ from torch"


def test_correction_is_version_guarded(monkeypatch):
    for unchecked in ((3, 4), (3, 10)):
        monkeypatch.setattr(interpreter, "_version", lambda: unchecked)
        assert not interpreter.affected()
    for checked in ((3, 5), (3, 9)):
        monkeypatch.setattr(interpreter, "_version", lambda: checked)
        assert interpreter.affected()
    for version, index in (((3, 5), True), ((3, 6), True), ((3, 7), False), ((3, 9), False)):
        monkeypatch.setattr(interpreter, "_version", lambda: version)
        assert interpreter.index_affected() is index


def _scalar_loop(n):
    from csrc_triton.probes import _scalar_loop_probe_kernel

    x = torch.arange(n, dtype=torch.float32)
    out = torch.zeros(1)
    _scalar_loop_probe_kernel[(1,)](x, out, n, BLOCK=32)
    return out.item(), x.sum().item()


needs_index_fix = pytest.mark.skipif(not interpreter.index_affected(),
                                     reason="the scalar-index defect is in Triton 3.5 and 3.6 only")


@needs_index_fix
def test_scalar_loop_bound_fails_without_correction(without_correction):
    import numpy as np

    if tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4):
        pytest.skip("numpy < 2.4 still converts one-element arrays with int()")
    with pytest.raises(Exception, match="0-dimensional arrays"):
        _scalar_loop(100)


def test_scalar_loop_bound_works_with_correction():
    assert interpreter.apply()
    got, want = _scalar_loop(100)
    assert got == want


def test_unchecked_version_warns_and_leaves_triton_alone(monkeypatch):
    from triton.runtime import interpreter as interp

    interpreter.remove()
    monkeypatch.setattr(interpreter, "_version", lambda: (3, 10))
    monkeypatch.setattr(interpreter, "_warned", [])
    original = interp.InterpreterBuilder.create_dot
    try:
        with pytest.warns(RuntimeWarning, match="bf16 results under TRITON_INTERPRET"):
            assert interpreter.apply() is False
        assert interp.InterpreterBuilder.create_dot is original and not interpreter.active()
    finally:
        monkeypatch.undo()
        interpreter.apply()


def test_correction_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    interpreter.remove()
    try:
        assert interpreter.apply() is False
        assert not interpreter.active()
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpreter.apply()
