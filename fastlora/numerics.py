"""How close is close enough: the per-dtype bound every kernel is held to.

A kernel result in dtype d is compared with the float64 reference (`truth`). It passes when

    max |kernel - truth|  <=  2 * max |baseline - truth|  +  atol

where `baseline` is plain PyTorch computing the same thing in dtype d (fastlora.reference with
d inputs: dequantize to d, torch matmuls in d), and atol is one ulp of d at the result's scale
(finfo(d).eps * max |truth|: relative, so small-valued results, gradients of 1e-3 say, are not
waved through by an absolute floor). The factor 2 and the atol follow flash-attention's test
rule; nothing is tuned per test. Used by tests/ and by `fastlora verify`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Comparison:
    name: str
    dtype: torch.dtype
    max_err: float        # max |out - truth|
    baseline_err: float   # max |baseline - truth|
    atol: float
    worst_index: tuple    # where max_err happens
    out_value: float
    truth_value: float
    nonfinite_mismatch: int  # positions where out and truth disagree on NaN/Inf

    @property
    def bound(self) -> float:
        return 2.0 * self.baseline_err + self.atol

    @property
    def ok(self) -> bool:
        return self.nonfinite_mismatch == 0 and self.max_err <= self.bound

    def message(self) -> str:
        text = (f"{self.name} [{str(self.dtype).replace('torch.', '')}]: max err "
                f"{self.max_err:.3e} at {self.worst_index} (got {self.out_value:.6g}, float64 "
                f"reference {self.truth_value:.6g}); bound {self.bound:.3e} = 2 x plain-PyTorch "
                f"err {self.baseline_err:.3e} + atol {self.atol:.1e}")
        if self.nonfinite_mismatch:
            text += f"; {self.nonfinite_mismatch} positions disagree on NaN/Inf"
        return text


def atol_for(dtype: torch.dtype, truth: torch.Tensor) -> float:
    finite = truth[torch.isfinite(truth)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.finfo(dtype).eps * scale


def compare(name: str, out: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor,
            dtype: torch.dtype | None = None) -> Comparison:
    """Measure `out` (and the plain-PyTorch `baseline`) against the float64 `truth`."""
    if out.shape != truth.shape or baseline.shape != truth.shape:
        raise ValueError(f"{name}: shapes differ: out {tuple(out.shape)}, truth "
                         f"{tuple(truth.shape)}, baseline {tuple(baseline.shape)}")
    dtype = dtype or out.dtype
    out64, truth64, base64 = out.double(), truth.double(), baseline.double()
    finite = torch.isfinite(truth64)
    nonfinite_mismatch = int((~finite & ~((out64 == truth64) | (out64.isnan() & truth64.isnan())))
                             .sum()) + int((finite & ~torch.isfinite(out64)).sum())
    err = torch.where(finite, (out64 - truth64).abs(), torch.zeros_like(truth64))
    err = torch.nan_to_num(err, nan=float("inf"))
    base_err = torch.where(finite & torch.isfinite(base64), (base64 - truth64).abs(),
                           torch.zeros_like(truth64))
    if err.numel() == 0:
        return Comparison(name, dtype, 0.0, 0.0, 0.0, (), 0.0, 0.0, nonfinite_mismatch)
    flat = int(err.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    return Comparison(name, dtype, float(err.max()), float(base_err.max()),
                      atol_for(dtype, truth64), index, float(out64.reshape(-1)[flat]),
                      float(truth64.reshape(-1)[flat]), nonfinite_mismatch)


def assert_close(name: str, out: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor,
                 dtype: torch.dtype | None = None) -> Comparison:
    """`compare`, raising AssertionError with where and how much when the bound is broken."""
    result = compare(name, out, truth, baseline, dtype)
    if not result.ok:
        raise AssertionError(result.message())
    return result
