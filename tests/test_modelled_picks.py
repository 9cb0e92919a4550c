"""The modelled fused-vs-dequantize picks the dispatcher takes where it cannot time (issue 31
item 4): fastlora/data/modelled_picks.json, written by fastlora.bench.picks from the model
(fastlora.bench.model.expected_pick over the GPU table and the committed compile record), and
read by fastlora.launch.dispatch.modelled_pick. Modelled, not measured: no GPU here."""

from __future__ import annotations

import json

import pytest
import torch

from fastlora import gpus
from fastlora.bench import model, picks
from fastlora.bench.peaks import peak_of
from fastlora.launch import dispatch

pytestmark = pytest.mark.quick


def _model_pick(gpu_name: str, role: str, dtype: torch.dtype, n: int, k: int, m: int) -> str:
    """The model's own answer (not the table's): expected_pick at this exact shape."""
    gpu = gpus.gpu_named(gpu_name)
    e = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    ceilings = model.kernel_ceilings(gpu.arch, "16bit" if e == 2 else "fp32")
    return model.expected_pick("full", model.Dims(m=m, n=n, k=k, r=picks.RANK, e=e),
                               peak_of(gpu), ceilings, gpu.arch)[role]


@pytest.fixture
def on_gpu(monkeypatch):
    """cuda:0 named `name` for the dispatcher (no CUDA here: the name cache is filled)."""
    def name_it(name: str) -> torch.device:
        monkeypatch.setitem(dispatch._NAMES, "cuda:0", name)
        return torch.device("cuda", 0)
    return name_it


def test_the_committed_table_is_what_the_model_computes_now():
    committed = json.loads(picks.PICKS_PATH.read_text(encoding="utf-8"))
    assert committed == picks.table(), (
        "fastlora/data/modelled_picks.json is stale (a kernel's compiled ceiling or the GPU "
        "table moved): rewrite it with `python -m fastlora.bench.picks`")
    assert set(committed["gpus"]) == set(gpus.names())


def test_dequant_from_reads_the_last_run_of_dequant_picks():
    n = len(picks.MS)
    assert picks.dequant_from(["fused"] * n) is None
    assert picks.dequant_from(["dequant"] * n) == 1
    assert picks.dequant_from(["fused"] * 9 + ["dequant"] * (n - 9)) == 512
    # a dequant pick followed by a fused one does not start the run; the last pick fused: None
    mixed = ["fused", "dequant", "fused"] + ["dequant"] * (n - 4) + ["fused"]
    assert picks.dequant_from(mixed) is None
    assert picks.dequant_from(["fused", "dequant", "fused"] + ["dequant"] * (n - 3)) == 8


@pytest.mark.parametrize("gpu_name", ["B200", "H100 SXM", "A100 SXM 80GB"])
def test_one_break_even_per_shape_tells_the_models_pick_at_every_m(gpu_name):
    """The table's single threshold is exact on its grid: fused below, dequant from it (the
    model's picks never flip back), for each shape, role and dtype class."""
    entry = json.loads(picks.PICKS_PATH.read_text(encoding="utf-8"))["gpus"][gpu_name]
    for dtype, klass in ((torch.bfloat16, "16bit"), (torch.float32, "fp32")):
        for i, (n, k) in enumerate(picks.SHAPES):
            for role in ("forward", "dx"):
                start = entry[klass][role][i]
                for m in picks.MS:
                    want = "dequant" if start is not None and m >= start else "fused"
                    assert _model_pick(gpu_name, role, dtype, n, k, m) == want, \
                        (gpu_name, klass, role, n, k, m, start)


def test_modelled_pick_follows_the_model_on_a_b200(on_gpu):
    device = on_gpu("NVIDIA B200")
    # the model's own answers at the table's shapes, both roles, 16-bit and fp32
    for n, k in picks.SHAPES[:4]:
        for m in (16, 256, 1024, 4096, 16384):
            for role in ("forward", "dx"):
                for dtype in (torch.bfloat16, torch.float32):
                    assert dispatch.modelled_pick(role, device, dtype, n=n, k=k, m=m) == \
                        _model_pick("B200", role, dtype, n, k, m), (n, k, m, role, dtype)
    # on a B200 the model has dequantize + cuBLAS faster at training M, fused at decode M
    assert dispatch.modelled_pick("forward", device, torch.bfloat16, n=4096, k=4096,
                                  m=8192) == "dequant"
    assert dispatch.modelled_pick("dx", device, torch.float16, n=4096, k=4096, m=8) == "fused"
    # a shape off the table takes its nearest shape's break-even (4000 x 4100 -> 4096 x 4096)
    for m in picks.MS:
        assert dispatch.modelled_pick("forward", device, torch.bfloat16, n=4000, k=4100,
                                      m=m) == \
            dispatch.modelled_pick("forward", device, torch.bfloat16, n=4096, k=4096, m=m)


def test_modelled_pick_places_the_gpu_by_name_then_by_capability(on_gpu, monkeypatch):
    assert dispatch._table_gpu(on_gpu("NVIDIA A100-SXM4-80GB")) == "A100 SXM 80GB"
    # a GPU the table does not name: its compute capability's reference GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert dispatch._table_gpu(on_gpu("NVIDIA Future GPU")) == gpus.reference("sm_100").name
    # below sm_80 (no fused kernels there): no row, the fused answer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    device = on_gpu("Tesla T4")
    assert dispatch._table_gpu(device) is None
    assert dispatch.modelled_pick("forward", device, torch.bfloat16, n=4096, k=4096,
                                  m=65536) == "fused"
    # off CUDA: fused
    assert dispatch.modelled_pick("forward", torch.device("cpu"), torch.bfloat16, n=4096,
                                  k=4096, m=65536) == "fused"
    with pytest.raises(ValueError, match="role"):
        dispatch.modelled_pick("dA", device, torch.bfloat16, n=8, k=8, m=8)


def test_a_capture_without_a_pick_takes_the_modelled_path(monkeypatch):
    """Inside a CUDA graph capture nothing is timed: choose answers the model's pick (here a
    B200 at training M: dequantize + cuBLAS) and keeps no pick, so an eager call times both."""
    monkeypatch.setattr(dispatch, "_can_time", lambda device: True)
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    monkeypatch.setattr(dispatch, "_table_gpu", lambda device: "B200")
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: pytest.fail("timed during capture"))
    for role, m, want in (("forward", 8192, "dequant"), ("dx", 4, "fused")):
        out = torch.empty(m, 4096, dtype=torch.bfloat16, device="meta")
        assert dispatch.choose(role, out, lambda t: None, lambda t: None, n=4096, k=4096,
                               m=m) == want
        assert want == _model_pick("B200", role, torch.bfloat16, 4096, 4096, m)
    assert dispatch.picks() == {}


def test_the_readme_table_shows_the_committed_picks():
    """README's "where dequantize + cuBLAS is modelled faster" rows are the file's 16-bit
    Llama-3-8B columns (the first four shapes)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    entries = json.loads(picks.PICKS_PATH.read_text(encoding="utf-8"))["gpus"]
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].split(" (")[0] in entries:
            rows[cells[0].split(" (")[0]] = cells[1:]
    assert {"B200", "H100 SXM", "H200 SXM"} <= set(rows)
    for name, cells in rows.items():
        for role, cell in zip(("forward", "dx"), cells):
            want = ", ".join("never" if v is None else str(v)
                             for v in entries[name]["16bit"][role][:4])
            assert cell == want, (name, role, cell, want)
    never = next(line for line in readme.splitlines() if line.startswith("  | A100, A10"))
    named = [n.strip() for n in never.strip().strip("|").split("|")[0].split(",")]
    for gpu in gpus.GPUS:
        if any(gpu.name.startswith(n) for n in named):
            assert all(v is None for role in ("forward", "dx")
                       for v in entries[gpu.name]["16bit"][role][:4]), gpu.name
