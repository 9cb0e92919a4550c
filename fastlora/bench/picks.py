"""The modelled fused-vs-dequantize picks, as a table the dispatcher can read (issue 31 item 4).

fastlora's dispatcher (fastlora/launch/dispatch.py) times both base-product paths at a shape's
first call on a GPU. Where it cannot time (a CUDA graph being captured before an eager call
picked the shape), it takes the path the model expects to be faster: `expected_pick`
(fastlora.bench.model) over the GPU's row of the GPU table and its arch's compiled hot-loop
ceilings. The launchers sit below the benchmark code, so the model's answers are written
to PICKS_PATH (fastlora/data/modelled_picks.json) and the dispatcher reads that file.

Per GPU of the table, dtype class ('16bit': bf16 / fp16 activations; 'fp32') and role
('forward', 'dx'), the file holds for each shape of SHAPES (N, K) the smallest M of MS from
which the model expects dequantize + cuBLAS to be faster at that M and every larger one of
MS: `dequant_from`, null where the fused path is modelled faster at every M. LoRA rank RANK;
the LoRA-side kernels are the same on both paths, so the rank moves the break-even little.

`python -m fastlora.bench.picks` rewrites the file (with the pinned Triton, after the compile
record: the ceilings it reads come from there); `tests/test_modelled_picks.py` fails when the
file is not what the model computes from the committed record now. It is a model, not a measurement: figures and
assumptions as in fastlora.bench.model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .. import gpus
from . import model
from .peaks import peak_of

__all__ = ["SHAPES", "MS", "RANK", "CLASSES", "PICKS_PATH", "dequant_from", "table",
           "write_table"]

# Llama-3-8B's projections (q/o, k/v, gate/up, down) and Llama-3-70B's, (N, K)
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
          (8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))
MS = tuple(2 ** i for i in range(17))  # 1 .. 65536
RANK = 16
CLASSES = {"16bit": 2, "fp32": 4}  # dtype class -> bytes per activation element
PICKS_PATH = Path(__file__).resolve().parent.parent / "data" / "modelled_picks.json"


def dequant_from(picks: list) -> Optional[int]:
    """The smallest M of MS from which every pick in `picks` (one per M of MS) is 'dequant';
    None when the last one is 'fused'."""
    first = None
    for m, pick in zip(MS, picks):
        if pick == "dequant":
            first = m if first is None else first
        else:
            first = None
    return first


def _gpu_entry(gpu: gpus.GPU) -> dict:
    peak = peak_of(gpu)
    entry = {"arch": gpu.arch}
    for klass, e in CLASSES.items():
        ceilings = model.kernel_ceilings(gpu.arch, klass)
        roles = {"forward": [], "dx": []}
        for n, k in SHAPES:
            per_m = [model.expected_pick("full", model.Dims(m=m, n=n, k=k, r=RANK, e=e), peak,
                                         ceilings, gpu.arch) for m in MS]
            for role, column in roles.items():
                column.append(dequant_from([p[role] for p in per_m]))
        entry[klass] = roles
    return entry


def table() -> dict:
    """The file's content, computed now from the GPU table and the compile record."""
    return {"about": "modelled, not measured: fastlora.bench.picks (dequant_from: the "
                     "smallest M from which dequantize + cuBLAS is modelled faster)",
            "rank": RANK, "ms": list(MS), "shapes": [list(s) for s in SHAPES],
            "gpus": {gpu.name: _gpu_entry(gpu) for gpu in gpus.GPUS}}


def write_table(path: Path = PICKS_PATH) -> Path:
    """Write table() to `path`, one line per GPU (diffs show which GPU's picks moved)."""
    content = table()
    rows = [f"  {json.dumps(name)}: {json.dumps(entry)}"
            for name, entry in content.pop("gpus").items()]
    head = json.dumps(content)[:-1]
    path.write_text(head + ',\n "gpus": {\n' + ",\n".join(rows) + "\n }\n}\n",
                    encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_table()}")
