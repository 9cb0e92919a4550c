"""The committed compile record: compile-report rows keyed by everything that determines them.

Compiling every shipped config (fastlora.compilecheck.compile_report) takes minutes on two
cores, and each row is a pure function of what goes into its compile. RECORD_PATH holds the rows
under a key (`spec_key`) made of:
  - the spec: kernel, config, signature, constexprs, warps, stages, options, the arguments
    specialised as aligned or allowed 32-bit offsets, and the hot-loop model's inputs;
  - the arch, and the toolchain: the Triton release and its ptxas;
  - the source of the kernel's csrc_triton file and of every csrc_triton file it imports, and
    of fastlora/compilecheck.py (the SASS parsing and the hot-loop model);
  - the hot-loop model's per-clock figures for the arch (compilecheck.DENSE_MMA_FLOPS and
    HBM_BYTES_PER_CLOCK, from the arch's reference GPU in fastlora/gpus.py). That table's
    source is not hashed: a new row, or another GPU's figure, recompiles nothing.
`recorded_report` takes a row from the record when its key matches and compiles the rest, so a
change to one kernel file recompiles that file's configs only, and a new Triton everything.
recheck=(i, n) also recompiles slice i of n of the recorded rows and marks each that differs
(`record_mismatch`: the fields): .ci/run picks the slice from the commit, so consecutive runs
recompile the whole record and a record that no longer tells the truth fails CI.
`fastlora compile-report --write-record` rewrites the record (this toolchain's rows; other
Triton releases' rows are kept).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
from pathlib import Path

from .compilecheck import (DENSE_MMA_FLOPS, HBM_BYTES_PER_CLOCK, attach_calibration,
                           compile_report, report_jobs, toolchain)
from .slices import in_slice

RECORD_PATH = Path(__file__).parent / "data" / "compile_record.json"
RECORD_ENV = "FASTLORA_COMPILE_RECORD"  # "0": never read the record, compile every row
PROVENANCE = ("source", "record_mismatch")  # where a row came from, not what the compile gave
DERIVED = ("plain_ceiling", "vs_plain")  # from other rows (compilecheck.attach_calibration)
_CHECK_MODULE = "fastlora.compilecheck"
# compilecheck reads only figures spec_key holds itself from fastlora.gpus, and only
# interpreter_active from fastlora.backend (which decides where ops run, not what compiles)
_NOT_HASHED = {"fastlora.gpus", "fastlora.backend"}


def _sources(module_name: str, seen: dict) -> dict:
    """{module: source} for module_name and every module it imports with `from .x import`,
    recursively (csrc_triton's kernel files import their helpers that way)."""
    if module_name not in seen:
        text = Path(importlib.import_module(module_name).__file__).read_text(encoding="utf-8")
        seen[module_name] = text
        package = module_name.rsplit(".", 1)[0]
        for dep in re.findall(r"^\s*from \.(\w+) import", text, re.MULTILINE):
            if f"{package}.{dep}" not in _NOT_HASHED:
                _sources(f"{package}.{dep}", seen)
    return seen


@functools.lru_cache(maxsize=None)
def _source_digests(module_name: str) -> tuple:
    found = _sources(module_name, {})
    found.update(_sources(_CHECK_MODULE, {}))
    return tuple((name, hashlib.sha256(text.encode()).hexdigest())
                 for name, text in sorted(found.items()))


@functools.lru_cache(maxsize=1)
def _toolchain() -> str:
    return toolchain()


def spec_key(spec, arch: str) -> str:
    """The record key of `spec` compiled for `arch` (module docstring)."""
    what = {"kernel": spec.kernel, "config": spec.config, "arch": arch,
            "signature": spec.signature,
            "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
            "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "options": {k: repr(v) for k, v in spec.options.items()},
            "aligned": list(spec.aligned), "bounded_args": list(spec.bounded_args),
            "uses_dot": spec.uses_dot, "fma_dot": spec.fma_dot, "trip_flops": spec.trip_flops,
            "trip_bytes": spec.trip_bytes, "ceiling_target": spec.ceiling_target,
            "per_clock": [DENSE_MMA_FLOPS[arch], HBM_BYTES_PER_CLOCK[arch]],
            "toolchain": _toolchain(), "sources": _source_digests(spec.fn.fn.__module__)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def load_record(path=None) -> dict:
    """{key: row} from the record at path (default RECORD_PATH; {} when there is none)."""
    path = RECORD_PATH if path is None else path
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)["rows"]
    except FileNotFoundError:
        return {}


def config_slice(part, configs=None) -> list[tuple]:
    """The (kernel, config) pairs of slice part = (i, n) of the shipped configs (of `configs`
    when given), by a stable hash of kernel and config: n runs with i = 0..n-1 cover them all."""
    from csrc_triton import all_compile_specs

    pairs = sorted({(s.kernel, s.config) for s in all_compile_specs()}
                   if configs is None else set(map(tuple, configs)))
    return [p for p in pairs if in_slice("|".join(p), part)]


def _plain(row: dict) -> dict:
    """A row as JSON reads it back (lists, not tuples), without provenance fields."""
    return {k: v for k, v in json.loads(json.dumps(row)).items()
            if k not in PROVENANCE + DERIVED and k != "toolchain"}


def recorded_report(archs=("sm_80", "sm_90"), kernels=None, configs=None,
                    record: bool | None = None, recheck=None) -> list[dict]:
    """compile_report(archs, kernels, configs=configs)'s rows, in its order, each with
    `source` ("record" or "compiled"). record: read matching rows from RECORD_PATH (default:
    yes unless FASTLORA_COMPILE_RECORD=0); recheck (i, n): compile the recorded rows of slice i
    of n too, and give each that differs from its record `record_mismatch` (field names)."""
    if record is None:
        record = os.environ.get(RECORD_ENV, "1") != "0"
    jobs = report_jobs(archs, kernels, configs)
    recorded = load_record() if record else {}
    keys = [spec_key(spec, arch) for spec, arch in jobs] if recorded else [None] * len(jobs)
    todo = [j for j, key in enumerate(keys)
            if key not in recorded or (recheck and in_slice(key, recheck))]
    compiled = {}
    for arch in archs:  # one compile_report per arch (it runs a child under the interpreter)
        mine = [j for j in todo if jobs[j][1] == arch]
        if mine:
            rows = compile_report((arch,), configs=[(jobs[j][0].kernel, jobs[j][0].config)
                                                    for j in mine])
            compiled.update({(r["kernel"], r["config"], arch): r for r in rows})
    out = []
    for (spec, arch), key in zip(jobs, keys):
        row = compiled.get((spec.kernel, spec.config, arch))
        old = recorded.get(key)
        if row is None:
            out.append({**old, "source": "record"})
            continue
        row = {**_plain(row), "source": "compiled"}
        if old is not None:
            row["record_mismatch"] = sorted(f for f in set(row) | set(old)
                                            if f not in PROVENANCE + DERIVED
                                            and f != "toolchain"
                                            and row.get(f) != old.get(f))
        out.append(row)
    out = [{k: v for k, v in row.items()
            if k not in ("toolchain", "plain_ceiling", "vs_plain")} for row in out]
    return attach_calibration(out, jobs)


def write_record(archs=("sm_80", "sm_90"), path=None) -> tuple[int, int]:
    """Compile every shipped config for archs and write the record: this toolchain's rows of
    those archs replace their old ones; other toolchains' rows and other archs' are kept.
    Returns (written, kept)."""
    path = RECORD_PATH if path is None else path
    jobs = report_jobs(archs)
    rows = compile_report(archs)
    chain = _toolchain()
    kept = {k: v for k, v in load_record(path).items()
            if v.get("toolchain") != chain or v.get("arch") not in archs}
    fresh = {spec_key(spec, arch): {**_plain(row), "toolchain": chain}
             for (spec, arch), row in zip(jobs, rows)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"about": "fastlora/compilerecord.py: compile-report rows by key",
                   "rows": {**kept, **fresh}}, fh, indent=0, sort_keys=True)
        fh.write("\n")
    return len(fresh), len(kept)
