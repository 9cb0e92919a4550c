"""`fastlora verify`: the fused kernels against the float64 reference, on this machine.

For each case of the matrix (every activation dtype and quant type this device supports, with
and without double quantisation, bias and dropout spread over the cases) it runs the forward
and backward of fastlora.lora_linear_4bit on the Triton kernels (compiled on a GPU, in Triton's
interpreter on a CPU) and compares y, dx, dA, dB (and dbias) with the float64 reference, against
the bound of fastlora.numerics: 2 x the plain-PyTorch error in the same dtype + 1 ulp.
The cases come from fastlora.cases (weights quantised by bitsandbytes itself). The matrix ends
with fused groups (fastlora.lora_group_4bit: q/k/v-like and gate/up-like members that read one
x, each its own weight, rank and dropout), every member's outputs and gradients checked the same
way against its own float64 reference, and with DoRA layers (fastlora.dora_linear_4bit, with
and without dropout; the magnitude's gradient checked too) against
fastlora.reference.dora_linear_4bit, and with mixed batches (fastlora.mixed_linear_4bit: three
adapters of different ranks, scalings and dropout plus base-only rows in one batch; every
adapter's gradients checked) against fastlora.reference.mixed_linear_4bit.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import backend
from .bench import report
from .cases import (DEVICE, DTYPES, dora_fused, dora_magnitude, dora_reference_pair, fused,
                    group_out_grads, group_reference_pair, grouped, make_case, make_group_case,
                    make_mixed_case, mixed_fused, mixed_reference_pair, reference_pair, run,
                    run_dora, run_group, run_mixed)
from .numerics import compare


@dataclass(frozen=True)
class VerifyCase:
    m: int
    n: int
    k: int
    rank: int
    dtype: str
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    bias: bool = False
    dropout_p: float = 0.0
    lead: tuple = ()

    group: tuple = ()  # (out_features, rank, dropout p, bias) per member: a fused group
    dora: bool = False  # a DoRA layer (fastlora.dora_linear_4bit)
    mixed: tuple = ()  # (rank, scaling, dropout p) per adapter: a mixed batch

    @property
    def label(self) -> str:
        if self.group:
            members = "+".join(f"{n}r{r}" for n, r, _, _ in self.group)
            return f"group {self.m}x({members})x{self.k} {self.quant_type}"
        if self.mixed:
            adapters = "+".join(f"r{r}" + (f"p{p}" if p else "") for r, _, p in self.mixed)
            return (f"mixed {self.m}x{self.n}x{self.k} ({adapters} + base rows) "
                    f"{self.quant_type}{' bias' if self.bias else ''}")
        rows = "x".join(str(d) for d in (*self.lead, self.m))
        parts = [f"{rows}x{self.n}x{self.k} r{self.rank}", self.quant_type,
                 f"bs{self.blocksize}", "dq" if self.double_quant else "no-dq"]
        parts += ["bias"] if self.bias else []
        parts += [f"p={self.dropout_p}"] if self.dropout_p else []
        return ("DoRA " if self.dora else "") + " ".join(parts)


def supported_dtypes() -> list[str]:
    """Activation dtypes this device runs: all three on a CPU (the interpreter) and on GPUs
    with bf16 support (sm_80+); fp16 and fp32 on older GPUs."""
    if DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        return ["fp16", "fp32"]
    return list(DTYPES)


def matrix(full: bool = False) -> list[VerifyCase]:
    """The default matrix (well under 2 minutes on a 2-core CPU): dtype x quant type x double
    quant on one uneven shape (M=33; K=160, so quantisation blocks of 64 straddle rows), bias
    on the cases without double quantisation and dropout 0.1 on the FP4 ones; plus per dtype a
    decode call (M=1, the small-M kernel), leading batch dimensions, and block sizes 32 and
    128. --full adds block sizes up to 4096, more M and ranks, and larger shapes."""
    cases = [VerifyCase(33, 96, 160, 8, dt, qt, dq, bias=not dq,
                        dropout_p=0.1 if qt == "fp4" else 0.0)
             for dt, qt, dq in itertools.product(supported_dtypes(), ("nf4", "fp4"),
                                                 (True, False))]
    for dt in supported_dtypes():
        cases += [VerifyCase(1, 192, 320, 16, dt, bias=True),
                  VerifyCase(17, 96, 128, 8, dt, lead=(3,), dropout_p=0.1),
                  VerifyCase(64, 128, 256, 16, dt, blocksize=32),
                  VerifyCase(64, 128, 256, 16, dt, "fp4", False, blocksize=128)]
        if full:
            cases += [VerifyCase(64, 128, 256, 16, dt, blocksize=bs) for bs in (256, 1024, 4096)]
            cases += [VerifyCase(m, 192, 320, 16, dt, bias=True) for m in (2, 7, 16, 300)]
            cases += [VerifyCase(40, 160, 96, rk, dt, "fp4", dropout_p=0.2) for rk in (1, 64)]
            cases += [VerifyCase(128, 320, 448, 32, dt, "fp4", False, bias=True),
                      VerifyCase(256, 512, 512, 64, dt, dropout_p=0.05)]
    for dt in supported_dtypes():  # groups: q/k/v-like (dropout on two) and gate/up at M=1
        cases += [VerifyCase(33, 0, 160, 0, dt, group=((96, 8, 0.1, True), (48, 16, 0.0, False),
                                                      (48, 4, 0.2, False))),
                  VerifyCase(1, 0, 128, 0, dt, "fp4", group=((160, 12, 0.0, False),
                                                            (160, 12, 0.0, False)))]
    for dt in supported_dtypes():  # DoRA: tiled with bias and dropout, small-M without
        cases += [VerifyCase(33, 96, 192, 8, dt, bias=True, dropout_p=0.1, dora=True),
                  VerifyCase(3, 160, 128, 16, dt, "fp4", False, dora=True)]
    for dt in supported_dtypes():  # mixed batches: three adapters and base rows, tiled + M=4
        cases += [VerifyCase(40, 96, 160, 0, dt, bias=True,
                             mixed=((8, 2.0, 0.1), (16, 0.5, 0.0), (4, 1.0, 0.2))),
                  VerifyCase(4, 128, 128, 0, dt, "fp4", mixed=((16, 2.0, 0.0), (8, 1.0, 0.0)))]
    return cases


def check_case(vc: VerifyCase) -> list[dict]:
    """Forward + backward of one case on the kernels; one row per compared output."""
    dtype = DTYPES[vc.dtype]
    if vc.group:
        x, members = make_group_case(vc.m, vc.k, vc.group, dtype, vc.quant_type)
        dys = group_out_grads(members, vc.m, seed=99)
        truth, baseline = group_reference_pair(x, members, dtype, dys)
        return _rows(vc, run_group(grouped, x, members, dtype, dys), truth, baseline, dtype)
    g = torch.Generator().manual_seed(99)
    if vc.mixed:
        case, adapters, rows = make_mixed_case(vc.m, vc.n, vc.k, vc.mixed, dtype,
                                               vc.quant_type, vc.bias)
        grad_out = torch.randn(vc.m, vc.n, generator=g).to(DEVICE)
        truth, baseline = mixed_reference_pair(case, adapters, rows, dtype, grad_out)
        return _rows(vc, run_mixed(mixed_fused, case, adapters, rows, dtype, grad_out), truth,
                     baseline, dtype)
    case = make_case(vc.m, vc.n, vc.k, vc.rank, dtype, vc.quant_type, vc.blocksize,
                     vc.double_quant, vc.bias, vc.dropout_p, lead=vc.lead)
    grad_out = torch.randn(*vc.lead, vc.m, vc.n, generator=g).to(DEVICE)
    if vc.dora:
        magnitude = dora_magnitude(case)
        truth, baseline = dora_reference_pair(case, magnitude, dtype, grad_out)
        return _rows(vc, run_dora(dora_fused, case, magnitude, dtype, grad_out), truth,
                     baseline, dtype)
    truth, baseline = reference_pair(case, dtype, grad_out)
    return _rows(vc, run(fused, case, dtype, grad_out), truth, baseline, dtype)


def _rows(vc: VerifyCase, out: dict, truth: dict, baseline: dict, dtype) -> list[dict]:
    rows = []
    for name, value in out.items():
        if value is None:
            continue
        c = compare(name, value, truth[name], baseline[name], dtype)
        rows.append({"case": vc.label, "dtype": vc.dtype, "output": name,
                     "max_err": c.max_err, "bound": c.bound,
                     "ratio": c.max_err / c.bound if c.bound else float("inf"),
                     "result": "ok" if c.ok else "FAIL", "detail": "" if c.ok else c.message()})
    return rows


COLUMNS = [("case", "case"), ("dtype", "dtype"), ("output", "output"), ("max_err", "max err"),
           ("bound", "bound"), ("ratio", "err/bound"), ("result", "result")]


def preflight() -> None:
    """Select the kernels (they are what is verified); RuntimeError when they cannot run here
    (no GPU and TRITON_INTERPRET unset)."""
    os.environ["FASTLORA_BACKEND"] = "triton"
    backend.use_triton(torch.empty(0, device=DEVICE))


def verify(full: bool = False, out: str | None = None,
           say: Callable[[str], None] = print) -> int:
    """Run the matrix (after `preflight`); print the table; write verify.md / verify.csv
    into `out` when given. Returns the exit code: 0 when every output is within its bound,
    1 otherwise."""
    from tqdm import tqdm

    say(f"fastlora verify: {backend.describe(DEVICE)}")
    cases = matrix(full)
    rows, start = [], time.perf_counter()
    for vc in tqdm(cases, desc="verify", unit="case"):
        try:
            rows += check_case(vc)
        except Exception as exc:  # a crashing case is a failure with its reason, not a stop
            rows.append({"case": vc.label, "dtype": vc.dtype, "output": "-",
                         "max_err": float("nan"), "bound": float("nan"), "ratio": float("nan"),
                         "result": "ERROR", "detail": f"{type(exc).__name__}: {exc}"})
    failed = [r for r in rows if r["result"] != "ok"]
    say(report.text_table(rows, COLUMNS))
    for r in failed:
        say(f"{r['result']} {r['case']} [{r['dtype']}]: {r['detail']}")
    say(f"{len(rows) - len(failed)}/{len(rows)} outputs within bound over {len(cases)} cases "
        f"in {time.perf_counter() - start:.0f} s"
        + ("" if not failed else f"; {len(failed)} FAILED"))
    if out is not None:
        with open(os.path.join(out, "verify.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# fastlora verify\n\n{backend.describe(DEVICE)}. Bound: 2 x plain-PyTorch "
                     "error + 1 ulp (fastlora.numerics).\n\n"
                     + report.markdown_table(rows, COLUMNS + [("detail", "detail")]) + "\n")
        report.append_csv(os.path.join(out, "verify.csv"),
                          [{**report.environment(_device_name()), **r} for r in rows])
    return 1 if failed else 0


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
