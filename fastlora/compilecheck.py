"""Ahead-of-time compile check: every shipped kernel config, compiled for sm_80 and sm_90 (and
sm_86, sm_89, sm_100, sm_120: ARCHS) on this machine (no GPU needed), with its register /
spill / shared-memory use and tensor-core instruction count.

Triton compiles for a GPU it does not have: `triton.compile(ASTSource(...), target=
GPUTarget("cuda", 90, 32))` yields a cubin, and the wheel ships `cuobjdump`, which reads the
cubin's resource usage (REG, STACK, SHARED, LOCAL) and disassembles it (SASS), where sm_80
tensor-core instructions are HMMA, sm_90's warpgroup ones HGMMA and sm_100's tcgen05 ones
UTCHMMA (16-bit and tf32 operands, issued by one thread for the whole block; A from shared or
tensor memory, B from shared memory, the accumulator in tensor memory). STACK or LOCAL > 0
means register spills. The specs come from each kernel file's COMPILE_SPECS (csrc_triton).

Large-index safety: every load and store of a tensor that can pass 2^31 elements (x, y, dy,
dx, U, the packed weight, absmax, workspaces) must reach its pointer through at least one 64-bit
offset. `wide_addressing` reads that off the kernel's TTIR (def-use chains from each tt.load /
tt.store back to the pointer argument), so a 32-bit row offset anywhere is a reported problem.

Hot-loop model (`hot_loop`, `hot_loop_model`): a first-order static bound on how fast the
kernel's main loop can run, read off its SASS. The main loop is the back-branch region
[target, BRA] holding the most tensor-core instructions (if none holds any: the most
global-memory instructions; a kernel without a back branch counts its whole body). Per trip of that loop, per
SM and clock (DESIGN.md "Performance by construction"):
    loop_instructions  SASS instructions in the region (per warp, counted statically)
    issue_clocks       loop_instructions * num_warps / 4 schedulers
    mio_clocks         the shared-memory / L1 / shuffle pipe at 128 B per clock: each LDS, STS,
                       LDSM, SHFL, LDG, STG, LDGSTS, atomic... costs max(1, 32 lanes x bytes per
                       lane / 128) clocks (LDSM .x1/.x2/.x4: 1/2/4), times num_warps; plus the
                       tensor cores' own operand reads from shared memory: sm_90 wgmma per
                       warpgroup (wgmma_smem_bytes), sm_100 tcgen05 once per block
                       (tcgen05_shape). sm_100's moves between registers and tensor memory
                       (STTM / LDTM: the decoded weight tile stored as an MMA operand, the
                       accumulator read back) are counted on the same pipe at 128 B per clock:
                       an assumption (no published tensor-memory bandwidth), on the slow side
    mma_clocks         the spec's trip_flops / the dense tensor-core rate (bf16/fp16 FLOP per
                       clock per SM of the arch's reference GPU, fastlora/gpus.py; half that
                       where the loop's MMAs are tf32)
    ceiling            GEMM specs (trip_flops): mma_clocks / max(issue, mio), the best share of
                       tensor-core peak; memory-bound specs (trip_bytes): (trip_bytes / HBM bytes
                       per SM clock of the reference GPU) / max(issue, mio), the best share of
                       HBM bandwidth; both at most 1. None for fp32 'ieee' (FMA) rows.
    bound              "mma", "hbm" or None: which of the two the ceiling is a share of
It is optimistic (no latencies, bank conflicts, stalls or dual-issue limits, one trip's static
code only) and modelled, never measured: a config cannot run faster than its ceiling, and one
at its ceiling is not shown to be fast.

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

from .gpus import CONFIG_FAMILY, reference, smem_per_block_bytes

# the compile targets (issue 31): the two config families (sm_80: mma.sync, sm_90: wgmma) and
# the mma.sync GPUs that run sm_80's lists with 99 KB of shared memory a block (RTX 3090 / A10,
# RTX 4090 / L40S, RTX 5090 / RTX PRO 6000), and B200 (sm_100: tcgen05, running sm_80's lists
# with 227 KB of shared memory a block; Triton stages each tl.dot operand through shared or
# tensor memory there).
ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_100": 100, "sm_120": 120}
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA_OPS = ("HMMA", "HGMMA", "UTCHMMA")
_MMA = re.compile(rf"\b({'|'.join(_MMA_OPS)})\b")
# sm_90 wgmma whose A operand comes from registers: `HGMMA.64x128x16.F32.BF16 R88, R32, gdesc..`
# (the shared-memory form reads `HGMMA... R88, gdesc[UR8], ...`)
_HGMMA_REGISTER_A = re.compile(r"\bHGMMA\.\S+\s+R\d+,\s*R\d+,")
# Atomics in the TTIR (tt.atomic_rmw / tt.atomic_cas) and in the PTX (atom.* / red.*)
_TTIR_ATOMIC = re.compile(r"\btt\.atomic_\w+")
_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", re.MULTILINE)
# ... of which on floating-point values: TTIR atomics on a pointer to a float type, PTX
# atom/red whose type suffix is a float one (.f32, .bf16x2, ...)
_TTIR_FLOAT_ATOMIC = re.compile(r"\btt\.atomic_\w+.*ptr<(?:f16|bf16|f32|f64)>")
_PTX_FLOAT_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.\S*\.(?:f16|bf16|f32|f64)"
                               r"(?:x2)?\s", re.MULTILINE)
FIELDS = ("kernel", "config", "arch", "registers", "stack_bytes", "local_bytes", "shared_bytes",
          "mma_instructions")
HOT_LOOP_FIELDS = ("loop_instructions", "issue_clocks", "mio_clocks", "mio_loop_clocks",
                   "mio_mma_clocks", "tma_loads", "mma_clocks", "ceiling", "bound")
# Hot-loop model constants, per SM and clock (datasheet peaks; DESIGN.md)
SCHEDULERS = 4  # warp instructions issued per clock
MIO_BYTES_PER_CLOCK = 128  # shared memory / L1 / shuffle pipe: one 32-lane 4-byte access
LANES = 32
WARPGROUP = 4  # warps that issue one sm_90 wgmma together
# Per arch, from its reference GPU (fastlora/gpus.py: sm_80 A100 SXM 80GB, sm_90 H100 SXM):
# dense bf16/fp16 tensor FLOP per clock per SM (tf32 is half), and HBM bytes per SM clock at
# the reference's bandwidth to 10 GB/s (2.04 TB/s for A100's 2,039: the figure the committed
# compile record's ceilings were computed with), ~13.4 sm_80, ~13.9 sm_90
DENSE_MMA_FLOPS = {arch: reference(arch).mma_flops_per_clock_sm for arch in ARCHS}
HBM_BYTES_PER_CLOCK = {arch: round(reference(arch).dram_gbs, -1) * 1e9 / reference(arch).sms
                       / reference(arch).clock_hz for arch in ARCHS}
# `/*57a0*/   @!P5 BRA 0x3810 ;` -> address, predicate, opcode, operands
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][\w.]*)([^;]*);",
                        re.MULTILINE)
_MIO_OPS = {"LDS", "STS", "LDSM", "STSM", "STTM", "LDTM", "SHFL", "LDG", "STG", "LDGSTS", "LDL",
            "STL", "LD", "ST", "ATOM", "ATOMS", "ATOMG", "RED"}
_GLOBAL_OPS = {"LDG", "STG", "LDGSTS", "LD", "ST", "ATOM", "ATOMG", "RED", "UTMALDG", "UTMASTG",
               "UTMAREDG", "UBLKCP"}
_DEF = re.compile(r"^\s*(%[\w#]+)(?::(\d+))?\s*=\s*([\w.]+)\s+(.*)$")
_ACCESS = re.compile(r"^(?:%[\w#]+ = )?tt\.(?:load|store) (%[\w#]+)")
_PTR_ARG = re.compile(r"%(\w+): !tt\.ptr")
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans",
                 "ttg.convert_layout", "iter_arg", "tt.bitcast")


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


def pointer_accesses(ttir: str) -> list[tuple[str, str, bool]]:
    """(op, argument, wide) for every tt.load / tt.store of a kernel's TTIR: the pointer
    argument it reads or writes, and whether some offset on the way is 64-bit.

    Follows each access's pointer back through tt.addptr (noting whether an offset is i64),
    splats, broadcasts, reshapes, bitcasts and loop-carried values to the kernel argument it
    came from. One pass in text order, each access traced with the definitions seen so far:
    sibling regions (two loops) may reuse an SSA name, and an access always refers to the
    latest definition above it."""
    defs = {}
    args = set(_PTR_ARG.findall(ttir))
    accesses = []
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
        accesses.append(("tt.store" if "tt.store" in line else "tt.load", ptr[1:], wide))
    return accesses


def narrow_pointer_args(ttir: str) -> set:
    """Pointer arguments that some tt.load / tt.store addresses with 32-bit offsets only."""
    return {arg for _, arg, wide in pointer_accesses(ttir) if not wide}


def code_table_loads(ttir: str) -> int:
    """How many tt.load ops read the 4-bit code table (`code_ptr`) through memory: 0 when the
    kernel holds the table in registers (csrc_triton/common.py lane_table: one inline-asm load
    per lane, invisible here) and looks values up by warp shuffle."""
    return sum(op == "tt.load" and arg == "code_ptr" for op, arg, _ in pointer_accesses(ttir))


def hgmma_register_a(sass: str) -> int:
    """How many sm_90 wgmma instructions take their A operand from registers (SASS
    `HGMMA.64x128x16.F32.BF16 R88, R32, gdesc[UR20], R88`), not from shared memory (`gdesc`)."""
    return len(_HGMMA_REGISTER_A.findall(sass))


def _mio_clocks(opcode: str) -> int:
    """Clocks one warp instruction holds the 128 B/clock MIO pipe (0: not an MIO instruction)."""
    base, *mods = opcode.split(".")
    if base not in _MIO_OPS:
        return 0
    if base in ("LDSM", "STSM"):  # LDSM.16.M88.4: four 8x8 b16 matrices, 128 B each
        return int(mods[-1]) if mods and mods[-1] in ("1", "2", "4") else 1
    if base in ("STTM", "LDTM"):  # sm_100 tensor memory (module docstring: an assumption)
        return _tmem_clocks(opcode)
    lane_bytes = 16 if "128" in mods else 8 if "64" in mods else 4
    return max(1, LANES * lane_bytes // MIO_BYTES_PER_CLOCK)


# sm_100 moves between registers and tensor memory, as SASS writes them: `STTM.x8` (PTX
# tcgen05.st .32x32b.x8: 32 lanes, 8 32-bit registers each) and `LDTM.16dp32bit_t0_t15.x32`
# (half of a PTX .16x32bx2.x32: lanes 0-15, 32 registers each; lanes 16-31 in a second one)
_TMEM_MOVE = re.compile(r"(?:16dp32bit_t(\d+)_t(\d+)\.)?x(\d+)")


def _tmem_clocks(opcode: str) -> int:
    """Clocks one sm_100 STTM / LDTM holds the pipe at 128 B per clock: lanes x registers x
    4 B (STTM.x8: 32 x 8 x 4 = 1 KB, 8 clocks). Any other form is refused: its bytes would need
    reading off the PTX ISA first."""
    base, _, mods = opcode.partition(".")
    found = _TMEM_MOVE.fullmatch(mods)
    if found is None:
        raise ValueError(f"unknown tensor-memory move {opcode}: only {base}.xN (32x32b) and "
                         f"{base}.16dp32bit_tA_tB.xN are modelled")
    first, last, registers = found.groups()
    lanes = int(last) - int(first) + 1 if first is not None else LANES
    return max(1, lanes * int(registers) * 4 // MIO_BYTES_PER_CLOCK)


def hot_loop(sass: str) -> dict:
    """The main loop of a cuobjdump -sass listing: instructions and MIO clocks per warp per trip.

    Each backward branch (BRA to a lower address, predicated or not) closes a loop [target,
    branch], except an unpredicated one from past the last unpredicated EXIT into the body
    (an out-of-line block's return); branches to one target form one loop. The main loop
    holds the most tensor-core instructions (HMMA, HGMMA, UTCHMMA), or, where none holds any,
    the most global-memory instructions; among equals an enclosing loop gives way to the loop
    inside it (there the work is), then the larger wins. Without a back branch the whole body
    counts, up to the first unpredicated EXIT.
    Returns start, end (addresses), instructions, mio_clocks, mma, tf32 (the loop's MMAs are),
    shuffles (SHFL instructions: the register-table code lookups), the tensor cores' operand
    bytes from shared memory (wgmma_smem_bytes per warpgroup, tcgen05_smem_bytes per block)
    and tma_loads."""
    code = [(int(a, 16), bool(pred), op, args) for a, pred, op, args in _SASS_LINE.findall(sass)]
    # past the body's last unpredicated EXIT lie out-of-line blocks (sm_100's mbarrier waits:
    # try again, then branch back into the body unconditionally), whose return closes no loop
    body_end = max((a for a, pred, op, _ in code if op == "EXIT" and not pred),
                   default=code[-1][0] if code else 0)
    ends = {}
    for addr, pred, op, args in code:
        targets = re.findall(r"0x[0-9a-f]+", args)
        if op.split(".")[0] != "BRA" or not targets:
            continue
        head = int(targets[-1], 16)
        returns = addr > body_end and not pred and head <= body_end
        if head < addr and not returns:
            ends[head] = max(addr, ends.get(head, 0))
    if not ends:
        last = next((a for a, pred, op, _ in code if op == "EXIT" and not pred),
                    code[-1][0] if code else 0)
        ends = {code[0][0] if code else 0: last}

    def body(start, end):
        return [op for a, _, op, _ in code if start <= a <= end]

    def weight(region):
        ops = body(*region)
        return (sum(op.split(".")[0] in _MMA_OPS for op in ops),
                sum(op.split(".")[0] in _GLOBAL_OPS for op in ops))

    regions = list(ends.items())
    use = 0 if any(weight(r)[0] for r in regions) else 1
    best = max(weight(r)[use] for r in regions)
    tied = [r for r in regions if weight(r)[use] == best]
    innermost = [r for r in tied if not any(o != r and r[0] <= o[0] and o[1] <= r[1]
                                           for o in tied)]
    start, end = max(innermost, key=lambda r: r[1] - r[0])
    region = [(op, args) for a, _, op, args in code if start <= a <= end]
    ops = [op for op, _ in region]
    mma = [op for op in ops if op.split(".")[0] in _MMA_OPS]
    tcgen05 = [tcgen05_shape(code, i) for i, (a, _, op, _) in enumerate(code)
               if start <= a <= end and op.split(".")[0] == "UTCHMMA"]
    return {"start": start, "end": end, "instructions": len(ops),
            "mio_clocks": sum(_mio_clocks(op) for op in ops), "mma": len(mma),
            "tf32": any(".TF32" in op for op in mma) or any(t["tf32"] for t in tcgen05),
            "shuffles": sum(op.split(".")[0] == "SHFL" for op in ops),
            "wgmma_smem_bytes": sum(wgmma_smem_bytes(op, args) for op, args in region),
            "tcgen05_smem_bytes": sum(t["smem_bytes"] for t in tcgen05),
            "tma_loads": sum(op.split(".")[0] in _TMA_OPS for op in ops)}


# bytes per element of a wgmma operand, by the type suffix of its SASS opcode
_WGMMA_ELEMENT_BYTES = {"F16": 2, "BF16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}
_TMA_OPS = {"UTMALDG", "UBLKCP"}  # bulk copies into shared memory, no LSU instruction


def wgmma_smem_bytes(opcode: str, operands: str) -> int:
    """Shared-memory operand bytes one sm_90 wgmma reads, per warpgroup: `HGMMA.64xNxK.F32.T`
    reads B (N x K elements of type T) through a descriptor always, and A (64 x K) too when A
    is a descriptor (`HGMMA... R24, gdesc[UR8], ...`) rather than registers (`R24, R168,
    gdesc[UR20], ...`). 0 for anything else."""
    parts = opcode.split(".")
    shape = re.fullmatch(r"(\d+)x(\d+)x(\d+)", parts[1]) if len(parts) > 1 else None
    if parts[0] != "HGMMA" or shape is None:
        return 0
    m, n, k = (int(v) for v in shape.groups())
    types = parts[3:]  # parts[2] is the accumulator's type (F32 / F16)
    unknown = [t for t in types if t not in _WGMMA_ELEMENT_BYTES]
    if unknown:
        raise ValueError(f"unknown wgmma operand type {unknown[0]} in {opcode}")
    # fp16 operands carry no type suffix (`HGMMA.64x256x16.F32`, as sm_80's HMMA.16816.F32)
    element = _WGMMA_ELEMENT_BYTES[types[-1]] if types else 2
    a_in_registers = re.match(r"\s*R\w+,\s*R\d+,", operands) is not None
    return (n * k + (0 if a_in_registers else m * k)) * element


# sm_100 tcgen05.mma instruction descriptor (PTX ISA, "Instruction descriptor" of .kind::f16 /
# .kind::tf32): A's type in bits 7-9 (f16 0, bf16 1, tf32 2), N >> 3 in bits 17-22, M >> 4 in
# bits 24-28. One instruction reduces over 32 bytes of K (16 16-bit or 8 tf32 elements).
_TCGEN05_A_TYPE_BYTES = {0: 2, 1: 2, 2: 4}
_UMOV_IMMEDIATE = re.compile(r"^\s*(UR\d+),\s*(0x[0-9a-f]+|\d+)\s*$")


def tcgen05_shape(code: list, index: int) -> dict:
    """M, N, K, tf32 and smem_bytes of the sm_100 `UTCHMMA a, b, d, ..., idesc[URn], ...` at
    code[index] (hot_loop's parsed listing: address, predicated, opcode, operands). The shape
    and A's type come from the instruction descriptor: the immediate of the last `UMOV URn,
    imm` above it in the listing (Triton sets it next to the MMA, or once before the loop).
    smem_bytes: the operand bytes the tensor core reads from shared memory, once for the whole
    block: B (N x K) always, A (M x K) when it is a descriptor (`gdesc[..]`) rather than tensor
    memory (`tmem[..]`)."""
    operands = [o.strip() for o in code[index][3].split(",")]
    idesc = next((re.fullmatch(r"idesc\[(UR\d+)\]", o) for o in operands
                  if o.startswith("idesc[")), None)
    if idesc is None:
        raise ValueError(f"no idesc[URn] operand in UTCHMMA {code[index][3].strip()}")
    value = None
    for _, _, op, args in reversed(code[:index]):
        found = _UMOV_IMMEDIATE.match(args) if op == "UMOV" else None
        if found and found.group(1) == idesc.group(1):
            value = int(found.group(2), 0)
            break
    if value is None:
        raise ValueError(f"no UMOV {idesc.group(1)}, imm above the UTCHMMA at "
                         f"{code[index][0]:#x}: its shape is not static")
    a_type = (value >> 7) & 0x7
    if a_type not in _TCGEN05_A_TYPE_BYTES:
        raise ValueError(f"tcgen05 descriptor {value:#x}: unknown A type {a_type}")
    element = _TCGEN05_A_TYPE_BYTES[a_type]
    m, n, k = ((value >> 24) & 0x1F) << 4, ((value >> 17) & 0x3F) << 3, 32 // element
    a_in_smem = operands[0].startswith("gdesc[")
    return {"m": m, "n": n, "k": k, "tf32": a_type == 2,
            "smem_bytes": (n * k + (m * k if a_in_smem else 0)) * element}


def hot_loop_model(loop: dict, arch: str, num_warps: int, trip_flops: int = 0,
                   trip_bytes: int = 0, fma_dot: bool = False) -> dict:
    """The compile report's HOT_LOOP_FIELDS for one trip of `loop` (hot_loop's answer) run by
    num_warps warps on one SM of `arch` (module docstring: a first-order static bound)."""
    issue = loop["instructions"] * num_warps / SCHEDULERS
    # the loop's own shared-memory / L1 / shuffle traffic, per warp, and the tensor cores'
    # operand reads, which take the same 128 B per clock: wgmma's per warpgroup (num_warps / 4
    # of them), tcgen05's once per block (one thread issues it for all warps)
    mio_loop = loop["mio_clocks"] * num_warps
    mio_mma = (loop.get("wgmma_smem_bytes", 0) * (num_warps / WARPGROUP)
               + loop.get("tcgen05_smem_bytes", 0)) / MIO_BYTES_PER_CLOCK
    mio = mio_loop + mio_mma
    rate = DENSE_MMA_FLOPS[arch] / (2 if loop["tf32"] else 1)
    mma = None if fma_dot else trip_flops / rate
    busy = max(issue, mio)
    bound = work = None
    if not fma_dot and busy > 0:
        if trip_flops:
            bound, work = "mma", mma
        elif trip_bytes:
            bound, work = "hbm", trip_bytes / HBM_BYTES_PER_CLOCK[arch]
    return {"loop_instructions": loop["instructions"], "issue_clocks": issue,
            "mio_clocks": mio, "mio_loop_clocks": mio_loop, "mio_mma_clocks": mio_mma,
            "tma_loads": loop.get("tma_loads", 0), "mma_clocks": mma, "bound": bound,
            "ceiling": None if bound is None else min(1.0, work / busy)}


def atomic_ops(ttir: str, ptx: str, floating: bool = False) -> int:
    """How many atomic operations a compiled kernel has: TTIR tt.atomic_* ops plus PTX atom. /
    red. instructions; floating=True: only those on floating-point values. A kernel without
    float atomics sums each output element in a fixed order: what makes fastlora's dB and dA
    bit-identical run to run. Integer atomics on arrival counters (csrc_triton/common.py
    last_to_arrive) only decide which program sums, not the order of the sum."""
    if floating:
        return len(_TTIR_FLOAT_ATOMIC.findall(ttir)) + len(_PTX_FLOAT_ATOMIC.findall(ptx))
    return len(_TTIR_ATOMIC.findall(ttir)) + len(_PTX_ATOMIC.findall(ptx))


def compile_spec(spec, arch: str) -> dict:
    """Compile one CompileSpec for `arch` (one of ARCHS) and measure it.

    Beyond FIELDS: uses_dot and fma_dot (the spec's), i32_addressed (narrow_pointer_args),
    hgmma_register_a (sm_90 wgmma instructions taking A from registers), atomics and
    float_atomics (atomic_ops), and the hot-loop model's HOT_LOOP_FIELDS (hot_loop_model)."""
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
    loop = hot_loop(sass)
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
            "atomics": atomic_ops(kernel.asm["ttir"], kernel.asm["ptx"]),
            "float_atomics": atomic_ops(kernel.asm["ttir"], kernel.asm["ptx"], floating=True),
            "decodes_weight": "code_ptr" in spec.signature,
            "code_table_loads": code_table_loads(kernel.asm["ttir"]),
            "loop_shuffles": loop["shuffles"], "ceiling_target": spec.ceiling_target,
            **hot_loop_model(loop, arch, spec.num_warps, spec.trip_flops, spec.trip_bytes,
                             spec.fma_dot)}


def compile_report(archs=("sm_80", "sm_90"), kernels=None, workers: int | None = None,
                   configs=None) -> list[dict]:
    """One dict per kernel x config x arch (fields: kernel, config, arch, registers,
    stack_bytes, local_bytes, shared_bytes, mma_instructions; the hot-loop model's
    loop_instructions, issue_clocks, mio_clocks, mma_clocks, ceiling, bound; plus what
    compile_spec adds).

    kernels: optional iterable of kernel names to restrict the report to; configs: optional
    iterable of (kernel, config) pairs (CompileSpec.kernel, .config) to restrict it further."""
    archs = tuple(archs)
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    from .backend import interpreter_active

    if interpreter_active():
        return _report_in_child(archs, kernels, workers, configs)
    jobs = report_jobs(archs, kernels, configs)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # ptxas runs as a subprocess
        return attach_calibration(list(pool.map(lambda job: compile_spec(*job), jobs)), jobs)


def attach_calibration(rows: list[dict], jobs: list[tuple]) -> list[dict]:
    """Give each fused GEMM row (rows[i] compiled from jobs[i] = (spec, arch)) whose plain-GEMM
    calibration row (csrc_triton/calibration.py) is in `rows` too: plain_ceiling, that row's
    ceiling, and vs_plain = its own ceiling / plain_ceiling (the share of a plain GEMM's
    possible speed of the same tile the fused loop keeps). Returns rows."""
    from csrc_triton.calibration import PLAIN_KERNEL, plain_spec, plain_tile

    plain = {(r["config"], r["arch"]): r["ceiling"] for r in rows
             if r["kernel"] == PLAIN_KERNEL and r.get("ceiling")}
    for row, (spec, arch) in zip(rows, jobs):
        tile = plain_tile(spec)
        ceiling = plain.get((plain_spec(tile, arch).config, arch)) if tile else None
        if ceiling and row.get("ceiling") is not None:
            row["plain_ceiling"] = ceiling
            row["vs_plain"] = row["ceiling"] / ceiling
    return rows


def report_jobs(archs, kernels=None, configs=None) -> list[tuple]:
    """(spec, arch) pairs compile_report(archs, kernels, configs=configs) compiles, in its
    row order."""
    from csrc_triton import all_compile_specs

    wanted = set(kernels) if kernels is not None else None
    pairs = {tuple(pair) for pair in configs} if configs is not None else None
    return [(spec, arch) for spec in all_compile_specs() for arch in archs
            if compiles_for(spec, arch) and (wanted is None or spec.kernel in wanted)
            and (pairs is None or (spec.kernel, spec.config) in pairs)]


def compiles_for(spec, arch: str) -> bool:
    """Whether `spec` is compiled for `arch`: an arch it names, or one whose config family
    (fastlora.gpus.CONFIG_FAMILY: sm_86, sm_89, sm_100 and sm_120 run sm_80's lists) it names
    unless that arch runs another config in its place (CompileSpec.not_for: csrc_triton's
    SIBLING_FIXES)."""
    return arch in spec.archs or (arch not in CONFIG_FAMILY.values()
                                  and CONFIG_FAMILY.get(arch) in spec.archs
                                  and arch not in spec.not_for)


def toolchain() -> str:
    """The Triton release and the ptxas that compile for it (what a compile's result depends
    on besides the kernel's source and the spec)."""
    import triton

    ptxas = _run("ptxas", "--version").strip().splitlines()[-1]
    return f"triton {triton.__version__}; {ptxas}"


def _report_in_child(archs, kernels, workers, configs) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([list(archs), list(kernels) if kernels is not None else None, workers,
                       [list(pair) for pair in configs] if configs is not None else None])
    code = ("import json, sys; from fastlora.compilecheck import compile_report; "
            "a, k, w, c = json.loads(sys.argv[1]); "
            "print(json.dumps(compile_report(a, k, w, c)))")
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"compile report failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The gates in force where the corrected model (wgmma operand reads counted, issue 28) put a
# headline config below its target: (arch, target) -> the floor a regression must not cross.
# Each floor sits just under the configs' corrected ceiling today, so a regression still
# fails; the target stays the goal (issue 28 item 3, open): sm_90 fused GEMMs 0.67 (0.70 of a
# plain GEMM of their tile), the dU/dB kernel at R_PAD 64 0.65 of HBM. Per Triton release
# where codegen differs: 3.8 compiles the sm_90 fused GEMMs to 0.60 (their loop's own traffic
# 1184 clocks against 3.9's 1024; 3.5-3.7: 0.68-0.70).
# sm_100 (B200, issue 31 item 3, open): sm_80's lists, compiled for tcgen05 (Triton 3.9 only),
# sit far below every target: its tensor cores run twice sm_90's FLOP per clock and its HBM
# gives 29 B per SM clock (H100: 13.9) against the same 128 B per clock of shared memory, so the
# decode's own traffic bounds the GEMMs and the memory-bound kernels (small-M 0.23-0.26,
# M = 1 0.33-0.35, M = 2 0.23-0.28, U / dA / dU-dB 0.28-0.46, dequantize 0.65). Its own
# GEMM headlines (SIBLING_FIXES) reach: forward 256x128x64 w8 0.48, dx 256x64x128 w8 0.42
# (sm_80's tiles there: 0.43 and 0.33). Floors under those until the targets are met.
OPEN_FLOORS = {("sm_90", 0.85): {"default": 0.65, "v3_8": 0.55},
               ("sm_90", 0.75): {"default": 0.60},
               ("sm_100", 0.85): {"default": 0.40}, ("sm_100", 0.8): {"default": 0.60},
               ("sm_100", 0.75): {"default": 0.25}, ("sm_100", 0.7): {"default": 0.30},
               ("sm_100", 0.45): {"default": 0.20}, ("sm_100", 0.35): {"default": 0.20}}


def ceiling_gate(row: dict) -> float:
    """The modelled ceiling a headline row must reach: its target, or the floor in force for
    the running Triton release."""
    target = row.get("ceiling_target") or 0.0
    floors = OPEN_FLOORS.get((row["arch"], target))
    if floors is None:
        return target
    from csrc_triton.common import by_triton

    return by_triton(floors["default"], **{k: v for k, v in floors.items() if k != "default"})


def problems(rows: list[dict]) -> list[str]:
    """What is wrong with a report: spills, a tl.dot kernel with no tensor-core instruction, a
    large tensor addressed with 32-bit offsets, or a headline config (ceiling_target > 0) whose
    hot-loop ceiling is below its target or, for a kernel that decodes the 4-bit weight, whose
    decode is not the register-table one (no SHFL in its main loop, or a load of the code table
    through memory).

    fp32 dots at full precision ('ieee', rows with fma_dot) are the one exception, and the
    reverse holds for them: tensor cores have no fp32 x fp32 form, so such a kernel runs on
    the FMA units and a tensor-core instruction there would mean its dots were rounded to tf32."""
    found = []
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] on {row['arch']}"
        if row["stack_bytes"] or row["local_bytes"]:
            found.append(f"{where} spills: stack {row['stack_bytes']} B, local "
                         f"{row['local_bytes']} B")
        if row["shared_bytes"] > smem_per_block_bytes(row["arch"]):
            found.append(f"{where} needs {row['shared_bytes']} B of shared memory, more than "
                         f"the {smem_per_block_bytes(row['arch'])} B a block may use there")
        if row.get("fma_dot"):
            if row["mma_instructions"]:
                found.append(f"{where} is a full-precision fp32 (ieee) config but has "
                             f"{row['mma_instructions']} tensor-core instructions (tf32)")
        elif row.get("uses_dot") and row["mma_instructions"] == 0:
            found.append(f"{where} calls tl.dot but has no tensor-core instruction")
        if row.get("i32_addressed"):
            found.append(f"{where} addresses {', '.join(row['i32_addressed'])} with 32-bit "
                         "offsets only (overflows past 2^31 elements)")
        if row.get("tma_loads"):
            found.append(f"{where} has {row['tma_loads']} TMA copies in its main loop: their "
                         "shared-memory writes are not in the hot-loop model (it would flatter)")
        if row.get("ceiling_target"):
            gate = ceiling_gate(row)
            if (row.get("ceiling") or 0.0) < gate:
                found.append(f"{where} is a headline config: modelled ceiling "
                             f"{row.get('ceiling') or 0:.2f} is below its gate {gate:.2f}"
                             + (f" (target {row['ceiling_target']:.2f}, open)"
                                if gate != row["ceiling_target"] else ""))
            if row.get("decodes_weight") and (not row.get("loop_shuffles")
                                              or row.get("code_table_loads")):
                found.append(f"{where} is a headline config but its decode is not the "
                             f"register-table one ({row.get('loop_shuffles')} SHFL in the "
                             f"main loop, {row.get('code_table_loads')} loads of the code "
                             "table)")
    return found


def format_table(rows: list[dict]) -> str:
    """The report as an aligned text table (hot-loop columns: loop instructions per warp,
    issue / MIO / MMA clocks per trip, and the ceiling with what it is a share of)."""
    def num(value, fmt="{:.0f}"):
        return "-" if value is None else fmt.format(value)

    def mio(r):  # total = the loop's own traffic + the wgmma operand reads (sm_90)
        if not r.get("mio_mma_clocks"):
            return num(r.get("mio_clocks"))
        return f"{r['mio_clocks']:.0f}={r['mio_loop_clocks']:.0f}+{r['mio_mma_clocks']:.0f}"

    header = ("kernel", "config", "arch", "regs", "stack B", "local B", "shared B", "mma",
              "loop", "issue", "mio (loop+mma op.)", "mma clk", "ceiling", "vs plain")
    body = [(r["kernel"], r["config"], r["arch"], str(r["registers"]), str(r["stack_bytes"]),
             str(r["local_bytes"]), str(r["shared_bytes"]), str(r["mma_instructions"]),
             num(r.get("loop_instructions")), num(r.get("issue_clocks")), mio(r),
             num(r.get("mma_clocks")), num(r.get("ceiling"), "{:.2f} " + str(r.get("bound"))),
             num(r.get("vs_plain"), "{:.2f}"))
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
