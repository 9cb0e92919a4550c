"""Timing one provider in one mode on a GPU, and the mode callables the smoke pass reuses.

Modes (training, autograd on; x and the LoRA tensors require grad):
    forward   y = fn(x)                        (the autograd graph is built, as in training)
    backward  y.backward(dy) on a kept graph   (retain_graph: the forward is not timed)
    full      fn(x).backward(dy)
Timing is triton.testing.do_bench: CUDA events around each call, warm-up first, and before
each timed call it zeroes a 256 MB buffer so L2 starts cold. The inputs x and dy also rotate
over enough copies that together they exceed twice the L2 size (at most 8), so no call finds
its activations left in L2 by the previous one. Gradients are set to None between calls.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .providers import Built

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
MAX_COPIES = 8


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float  # memory allocated during one call beyond what was allocated before it


def copies_needed(bytes_per_copy: int, l2_bytes: int) -> int:
    """How many input copies to rotate over so they jointly exceed 2x L2 (1..MAX_COPIES)."""
    return max(1, min(MAX_COPIES, math.ceil(2 * l2_bytes / max(1, bytes_per_copy))))


def make_inputs(m: int, k: int, n: int, dtype: torch.dtype, device, copies: int, seed: int = 0):
    """`copies` pairs (x [m, k] requiring grad, dy [m, n])."""
    g = torch.Generator(device=device).manual_seed(seed)
    xs = [torch.randn(m, k, generator=g, device=device, dtype=dtype).requires_grad_(True)
          for _ in range(copies)]
    dys = [torch.randn(m, n, generator=g, device=device, dtype=dtype) for _ in range(copies)]
    return xs, dys


def mode_callable(built: Built, mode: str, xs: list, dys: list) -> Callable[[], None]:
    """A no-argument function running `mode` once on the next input copy."""
    turn = itertools.cycle(range(len(xs)))
    if mode == "forward":
        return lambda: built.fn(xs[next(turn)])
    if mode == "full":
        def full():
            i = next(turn)
            built.fn(xs[i]).backward(dys[i])
        return full
    if mode == "backward":
        ys = [built.fn(x) for x in xs]  # graphs kept; only backward is timed

        def backward():
            i = next(turn)
            ys[i].backward(dys[i], retain_graph=True)
        return backward
    raise ValueError(f"mode must be forward, backward or full, got {mode!r}")


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def measure(built: Built, mode: str, xs: list, dys: list, warmup_ms: int = 25,
            rep_ms: int = 100) -> Timing:
    """Median and p20/p80 (ms) of `mode` with do_bench, and its peak extra memory (MiB)."""
    from triton.testing import do_bench

    run = mode_callable(built, mode, xs, dys)
    grads = list(xs) + list(built.params)
    run()  # first call: compile / autotune outside the memory measurement
    torch.cuda.synchronize()
    _clear_grads(grads)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    _clear_grads(grads)
    median, p20, p80 = do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                quantiles=list(QUANTILES))
    _clear_grads(grads)
    return Timing(median, p20, p80, peak_mib)
