"""Test helpers. The case builders live in the package (fastlora.cases) because
`fastlora verify` and the benchmarks use them too; the kernel test matrix lives here."""

import itertools

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

# counting(execute): Triton launches by kernel name, counted where the runtime runs them;
# execute=False records them without running
from fastlora.bench.hosttime import recorded_launches as counting  # noqa: F401
from fastlora.cases import (  # noqa: F401
    DEVICE, DTYPES, LoraCase, bnb_weight, fused, group_out_grads, group_reference_pair,
    grouped, make_case, make_group_case, members_one_by_one, reference_pair, run, run_group)


# ----------------------------------------------------------------------------- kernel matrix

def pairwise(axes: dict) -> list[dict]:
    """A small set of combinations covering every pair of values of any two axes (greedy:
    each step takes the combination that covers the most uncovered pairs; deterministic)."""
    names = list(axes)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in axes[a] for vb in axes[b]}
    candidates = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
    chosen = []

    def gain(combo):
        return sum(((a, combo[a]), (b, combo[b])) in uncovered
                   for a, b in itertools.combinations(names, 2))

    while uncovered:
        best = max(candidates, key=gain)
        chosen.append(best)
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return chosen


AXES = {"dtype": ["fp16", "bf16", "fp32"], "quant": ["nf4", "fp4"], "dq": [True, False],
        "bs": [64, 128, 256], "bias": [True, False], "p": [0.0, 0.1], "rank": [1, 8, 12, 64],
        "m": [1, 3, 16, 17, 100],
        # 200: K % blocksize != 0 (blocks straddle rows); 193: odd K (rows start mid-byte);
        # 256: aligned (the vectorised decode)
        "k": [200, 193, 256]}
MATRIX = pairwise(AXES)


def case_id(c: dict) -> str:
    return (f"{c['dtype']}-{c['quant']}-dq{int(c['dq'])}-bs{c['bs']}-"
            f"{'bias' if c['bias'] else 'nobias'}-p{c['p']}-r{c['rank']}-m{c['m']}-k{c['k']}")


N = 72  # out_features of the matrix cases: not a multiple of 16, masked N edges everywhere


def quick_first(values, n: int = 2, unpack: bool = False) -> list:
    """values (parametrize cases) with the first n marked `quick`: the quick tier
    (tests/conftest.py, --tier quick) runs those, the other tiers all. unpack: each value is a
    tuple of several arguments."""
    return [(pytest.param(*v, marks=pytest.mark.quick) if unpack
             else pytest.param(v, marks=pytest.mark.quick)) if i < n else v
            for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- allocations

class RecordCreated(TorchDispatchMode):
    """Appends (op, shape, dtype) of every tensor an op creates to `created`. A dispatch mode
    is off while it runs an op, so code running inside a custom op's body needs one of its own
    (sharing the list)."""

    def __init__(self, created: list):
        super().__init__()
        self.created = created

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.created.append((str(func), tuple(t.shape), t.dtype))
        return out



# ----------------------------------------------------------------------------- the dispatcher

def tag_dispatch_candidates(monkeypatch, running: list) -> None:
    """Wraps fastlora.launch.dispatch.choose so that each candidate it is handed (fused,
    dequant and every `others` entry) sets running[:] = [(role, path)] before it runs: a
    mocked timer then knows which candidate it is timing."""
    from fastlora.launch import dispatch

    real_choose = dispatch.choose

    def choose(role, out, fused, dequant, others=None, **kwargs):
        def tag(path, fn):
            def tagged(t):
                running[:] = [(role, path)]
                return fn(t)
            return tagged
        return real_choose(role, out, tag("fused", fused), tag("dequant", dequant),
                           others={k: tag(k, v) for k, v in (others or {}).items()}, **kwargs)
    monkeypatch.setattr(dispatch, "choose", choose)
