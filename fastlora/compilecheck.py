"""Ahead-of-time compile check: every shipped kernel config, compiled for sm_80 and sm_90 on
this machine (no GPU needed), with its register / spill / shared-memory use and tensor-core
instruction count.

Triton compiles for a GPU it does not have: `triton.compile(ASTSource(...), target=
GPUTarget("cuda", 90, 32))` yields a cubin, and the wheel ships `cuobjdump`, which reads the
cubin's resource usage (REG, STACK, SHARED, LOCAL) and disassembles it (SASS), where sm_80
tensor-core instructions are HMMA and sm_90's warpgroup ones HGMMA. STACK or LOCAL > 0 means
register spills. The specs come from each kernel file's COMPILE_SPECS (csrc_triton).

Large-index safety: every load and store of a tensor that can pass 2^31 elements (x, y, dy,
dx, U, the packed weight, absmax, workspaces) must reach its pointer through at least one 64-bit
offset. `wide_addressing` reads that off the kernel's TTIR (def-use chains from each tt.load /
tt.store back to the pointer argument), so a 32-bit row offset anywhere is a reported problem.

Kernels decorated under TRITON_INTERPRET=1 are interpreter objects that cannot be compiled, so
when the interpreter is active the report runs in a child process without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCHS = {"sm_80": 80, "sm_90": 90}
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
# sm_90 wgmma whose A operand comes from registers: `HGMMA.64x128x16.F32.BF16 R88, R32, gdesc..`
# (the shared-memory form reads `HGMMA... R88, gdesc[UR8], ...`)
_HGMMA_REGISTER_A = re.compile(r"\bHGMMA\.\S+\s+R\d+,\s*R\d+,")
# Atomics in the TTIR (tt.atomic_rmw / tt.atomic_cas) and in the PTX (atom.* / red.*)
_TTIR_ATOMIC = re.compile(r"\btt\.atomic_\w+")
_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", re.MULTILINE)
FIELDS = ("kernel", "config", "arch", "registers", "stack_bytes", "local_bytes", "shared_bytes",
          "mma_instructions")
_DEF = re.compile(r"^\s*(%[\w#]+)(?::(\d+))?\s*=\s*([\w.]+)\s+(.*)$")
_ACCESS = re.compile(r"^(?:%[\w#]+ = )?tt\.(?:load|store) (%[\w#]+)")
_PTR_ARG = re.compile(r"%(\w+): !tt\.ptr")
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans",
                 "ttg.convert_layout", "iter_arg")


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}: this Triton wheel ships no CUDA "
                                "binary tools, so the compile report cannot run")
    return str(path)


def _run(tool: str, *args: str) -> str:
    done = subprocess.run([_nvidia_tool(tool), *args], capture_output=True, text=True,
                          check=True)
    return done.stdout


def narrow_pointer_args(ttir: str) -> set:
    """Pointer arguments that some tt.load / tt.store addresses with 32-bit offsets only.

    Follows each access's pointer back through tt.addptr (noting whether an offset is i64),
    splats, broadcasts, reshapes and loop-carried values to the kernel argument it came from."""
    defs = {}
    for line in ttir.splitlines():
        found = _DEF.match(line)
        if found:
            name, results, op, rest = found.groups()
            defs[name] = (op, rest)
            for i in range(int(results or 0)):
                defs[f"{name}#{i}"] = (op, rest)
        if "iter_args(" in line:
            for carried, init in re.findall(r"(%[\w#]+) = (%[\w#]+)",
                                            line.split("iter_args(", 1)[1]):
                defs[carried] = ("iter_arg", init)
    args = set(_PTR_ARG.findall(ttir))
    narrow = set()
    for line in ttir.splitlines():
        access = _ACCESS.match(line.strip())
        if not access:
            continue
        ptr, wide = access.group(1), False
        while ptr[1:] not in args:
            if ptr not in defs:
                raise ValueError(f"cannot trace pointer {ptr} in: {line.strip()}")
            op, rest = defs[ptr]
            if op == "tt.addptr":
                wide |= "i64" in rest.rsplit(":", 1)[-1].split(",")[-1]
            elif op not in _PASS_THROUGH:
                raise ValueError(f"cannot trace pointer {ptr} through {op}: {line.strip()}")
            ptr = re.findall(r"%[\w#]+", rest)[0]
        if not wide:
            narrow.add(ptr[1:])
    return narrow


def hgmma_register_a(sass: str) -> int:
    """How many sm_90 wgmma instructions take their A operand from registers (SASS
    `HGMMA.64x128x16.F32.BF16 R88, R32, gdesc[UR20], R88`), not from shared memory (`gdesc`)."""
    return len(_HGMMA_REGISTER_A.findall(sass))


def atomic_ops(ttir: str, ptx: str) -> int:
    """How many atomic operations a compiled kernel has: TTIR tt.atomic_* ops plus PTX atom. /
    red. instructions (a kernel without atomics writes each output element from one program,
    in a fixed order: what makes fastlora's dB and dA bit-identical run to run)."""
    return len(_TTIR_ATOMIC.findall(ttir)) + len(_PTX_ATOMIC.findall(ptx))


def compile_spec(spec, arch: str) -> dict:
    """Compile one CompileSpec for `arch` ('sm_80' / 'sm_90') and measure it.

    Beyond FIELDS: uses_dot and fma_dot (the spec's), i32_addressed (narrow_pointer_args),
    hgmma_register_a (sm_90 wgmma instructions taking A from registers), atomics
    (atomic_ops)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    arg_names = spec.fn.arg_names
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]]
             for name in spec.aligned if name in spec.signature}
    source = ASTSource(fn=spec.fn, signature={**spec.signature,
                                              **{k: "constexpr" for k in spec.constexprs}},
                       constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    kernel = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = _RESOURCE.search(_run("cuobjdump", "--dump-resource-usage", cubin))
        sass = _run("cuobjdump", "-sass", cubin)
    unsafe = sorted(narrow_pointer_args(kernel.asm["ttir"]) - set(spec.bounded_args))
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {spec.kernel}")
    registers, stack, shared, local = (int(v) for v in usage.groups())
    # Triton allocates shared memory dynamically: the cubin's static SHARED is ~0, the
    # launch-time figure is in the compiled metadata. Report the larger.
    shared = max(shared, int(getattr(kernel.metadata, "shared", 0) or 0))
    return {"kernel": spec.kernel, "config": spec.config, "arch": arch, "registers": registers,
            "stack_bytes": stack, "local_bytes": local, "shared_bytes": shared,
            "mma_instructions": len(_MMA.findall(sass)), "uses_dot": spec.uses_dot,
            "fma_dot": spec.fma_dot, "i32_addressed": unsafe,
            "hgmma_register_a": hgmma_register_a(sass),
            "atomics": atomic_ops(kernel.asm["ttir"], kernel.asm["ptx"])}


def compile_report(archs=("sm_80", "sm_90"), kernels=None, workers: int | None = None
                   ) -> list[dict]:
    """One dict per kernel x config x arch (fields: kernel, config, arch, registers,
    stack_bytes, local_bytes, shared_bytes, mma_instructions; plus what compile_spec adds).

    kernels: optional iterable of kernel names to restrict the report to."""
    archs = tuple(archs)
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    from .backend import interpreter_active

    if interpreter_active():
        return _report_in_child(archs, kernels, workers)
    from csrc_triton import all_compile_specs

    wanted = set(kernels) if kernels is not None else None
    jobs = [(spec, arch) for spec in all_compile_specs() for arch in archs
            if arch in spec.archs and (wanted is None or spec.kernel in wanted)]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # ptxas runs as a subprocess
        return list(pool.map(lambda job: compile_spec(*job), jobs))


def _report_in_child(archs, kernels, workers) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([list(archs), list(kernels) if kernels is not None else None, workers])
    code = ("import json, sys; from fastlora.compilecheck import compile_report; "
            "a, k, w = json.loads(sys.argv[1]); print(json.dumps(compile_report(a, k, w)))")
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"compile report failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def problems(rows: list[dict]) -> list[str]:
    """What is wrong with a report: spills, or a tl.dot kernel with no tensor-core instruction.

    fp32 dots at full precision ('ieee', rows with fma_dot) are the one exception, and the
    reverse holds for them: tensor cores have no fp32 x fp32 form, so such a kernel runs on
    the FMA units and an HMMA/HGMMA there would mean its dots were rounded to tf32."""
    found = []
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] on {row['arch']}"
        if row["stack_bytes"] or row["local_bytes"]:
            found.append(f"{where} spills: stack {row['stack_bytes']} B, local "
                         f"{row['local_bytes']} B")
        if row.get("fma_dot"):
            if row["mma_instructions"]:
                found.append(f"{where} is a full-precision fp32 (ieee) config but has "
                             f"{row['mma_instructions']} HMMA/HGMMA instructions (tf32)")
        elif row.get("uses_dot") and row["mma_instructions"] == 0:
            found.append(f"{where} calls tl.dot but has no HMMA/HGMMA instruction")
        if row.get("i32_addressed"):
            found.append(f"{where} addresses {', '.join(row['i32_addressed'])} with 32-bit "
                         "offsets only (overflows past 2^31 elements)")
    return found


def format_table(rows: list[dict]) -> str:
    """The report as an aligned text table."""
    header = ("kernel", "config", "arch", "regs", "stack B", "local B", "shared B", "mma")
    body = [(r["kernel"], r["config"], r["arch"], str(r["registers"]), str(r["stack_bytes"]),
             str(r["local_bytes"]), str(r["shared_bytes"]), str(r["mma_instructions"]))
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
