"""Device helpers shared by fastlora's kernels, and the CompileSpec record.

Weight format (DESIGN.md): W [N, K] flattened row-major; value j sits in byte j // 2, high
nibble when j is even; its scale is absmax[j // QBLOCK] (blocks may straddle rows). With double
quantisation absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset, two separately rounded
fp32 operations: launchers pass enable_fp_fusion=False so the GPU does not fuse them into an FMA
(which would change the last bit relative to bitsandbytes).

Arguments every weight-reading kernel takes, in this order:
    packed_ptr   uint8 [ceil(N*K/2)]   the packed weight (quant_storage viewed as bytes)
    absmax_ptr   fp32 [nblocks] or uint8 [nblocks] (DOUBLE_QUANT)
    absmax2_ptr  fp32 [ceil(nblocks/256)]   (DOUBLE_QUANT; else any valid pointer)
    code2_ptr    fp32 [256]                 (DOUBLE_QUANT; else any valid pointer)
    offset_ptr   fp32 [1]                   (DOUBLE_QUANT; else any valid pointer)
    code_ptr     fp32 [16]                  NF4 or FP4 table
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import triton
import triton.language as tl

NESTED_BLOCK = tl.constexpr(256)  # bnb compresses absmax in blocks of 256

# The running Triton's (major, minor): register allocation differs between releases, so a config
# that fits on one may spill on another. by_triton picks a config per release.
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


def by_triton(default, **older):
    """`default`, or the value given for the running Triton release as a keyword `v3_5=...`:
    the per-release config choices where codegen differs (each kernel file says why; the
    compile report run under each supported release, .ci/support-range, checks them)."""
    key = f"v{TRITON_VERSION[0]}_{TRITON_VERSION[1]}"
    for name in older:
        if not (name.startswith("v") and name[1:].replace("_", "").isdigit()):
            raise ValueError(f"by_triton: {name!r} is not a release like v3_5")
    return older.get(key, default)

# The GPUs besides sm_80 that run its config lists (fastlora.gpus.CONFIG_FAMILY): the mma.sync
# RTX 3090 / A10 (sm_86), RTX 4090 / L40S (sm_89), RTX 5090 / RTX PRO 6000 (sm_120), with 99 KB
# of shared memory a block, and B200 (sm_100: tcgen05, 227 KB), except where one of them spills
# or overflows there: SIBLING_FIXES (each kernel file's) replace or drop that config on that
# arch, at launch (sibling_configs) and in the compile report (sibling_specs).
SM80_SIBLINGS = ("sm_86", "sm_89", "sm_100", "sm_120")


@dataclass(frozen=True)
class SiblingFix:
    """On `archs` (siblings of sm_80), the sm_80 config of `kernel` (a name, or a tuple of
    kernels that share one autotune list) whose items include `match` (block sizes, num_warps,
    num_stages) takes `change` instead, or with change None is not run there (an autotune list
    entry the others cover). fp32 / ieee: the activation class (fp32 or 16-bit) and the fp32
    dot precision ('ieee' or not) it applies to, None: any; max_rank: only up to this (summed)
    padded rank, 0: any."""

    kernel: str | tuple
    archs: tuple
    match: dict
    change: dict | None
    fp32: bool | None = None
    ieee: bool | None = None
    max_rank: int = 0

    def applies(self, kernel: str, arch: str, items: dict, fp32: bool, ieee: bool,
                rank: int = 0) -> bool:
        names = (self.kernel,) if isinstance(self.kernel, str) else self.kernel
        return (kernel in names and arch in self.archs
                and all(items.get(k) == v for k, v in self.match.items())
                and self.fp32 in (None, fp32) and self.ieee in (None, ieee)
                and (not self.max_rank or rank <= self.max_rank))


def _items(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _changed(config, change: dict):
    if isinstance(config, dict):
        return {**config, **change}
    new = object.__new__(type(config))  # every attribute kept (copy.copy drops the ones
    new.__dict__.update(vars(config))   # triton.Config's __setstate__ does not know)
    new.kwargs = {**config.kwargs, **{k: v for k, v in change.items() if k.startswith("BLOCK")}}
    new.num_warps = change.get("num_warps", config.num_warps)
    new.num_stages = change.get("num_stages", config.num_stages)
    return new


def sibling_configs(fixes, kernel: str, arch: str, configs: list, fp32: bool,
                    ieee: bool = False, rank: int = 0) -> list:
    """`configs` (sm_80's: dicts or triton.Config) as `arch` runs them: unchanged on sm_80,
    sm_90 and any arch no fix names; a sibling's fixes replace or drop entries. rank: the
    (summed) padded rank of the launch, where a fix has a max_rank."""
    if arch not in SM80_SIBLINGS:
        return list(configs)
    out = []
    for config in configs:
        fix = next((f for f in fixes
                    if f.applies(kernel, arch, _items(config), fp32, ieee, rank)), None)
        if fix is None:
            out.append(config)
        elif fix.change is not None:
            out.append(_changed(config, fix.change))
    return out


def sibling_config(fixes, kernel: str, arch: str, config, fp32: bool, ieee: bool = False,
                   rank: int = 0):
    """The one config of a kernel launched without a tuner (the U kernels, the dA group
    kernel) as `arch` runs it: sibling_configs of [config]. A fix may replace such a config,
    never drop it (nothing would be left to launch)."""
    fixed = sibling_configs(fixes, kernel, arch, [config], fp32, ieee, rank)
    if not fixed:
        raise ValueError(f"a SiblingFix drops {kernel}'s only config on {arch}: it must "
                         "replace it")
    return fixed[0]


def spec_class(spec) -> tuple:
    """(fp32 activations, ieee, padded rank) of a CompileSpec: its label names the activation
    dtype first; the rank is the group's summed R_PAD{g} (G members), else R_PAD or BLOCK_R."""
    c = spec.constexprs
    rank = (sum(c[f"R_PAD{g}"] for g in range(c["G"])) if "R_PAD0" in c
            else c.get("R_PAD", c.get("BLOCK_R", 0)))
    return spec.label.split(" ")[0] == "fp32", spec.fma_dot, rank


def sibling_specs(fixes, specs: list) -> list:
    """`specs` with the fixes applied for the compile report: an sm_80 spec a fix matches is
    not compiled for that sibling (CompileSpec.not_for), and its replacement is, as its own
    spec (archs: the siblings that run it), its trip work rescaled by the changed block sizes
    it is the product of (CompileSpec.trip_blocks)."""
    out = []
    for spec in specs:
        if "sm_80" not in spec.archs:
            out.append(spec)
            continue
        fp32, ieee, rank = spec_class(spec)
        items = {**spec.constexprs, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
        replaced: dict = {}
        for arch in SM80_SIBLINGS:
            fix = next((f for f in fixes
                        if f.applies(spec.kernel, arch, items, fp32, ieee, rank)), None)
            if fix is not None:
                replaced.setdefault(repr(fix.change), (fix.change, []))[1].append(arch)
        skipped = tuple(a for _, archs in replaced.values() for a in archs)
        out.append(dataclasses.replace(spec, not_for=spec.not_for + skipped) if skipped
                   else spec)
        for change, archs in replaced.values():
            if change is not None:
                blocks = {k: v for k, v in change.items() if not k.startswith("num_")}
                new, old = 1, 1
                for name in spec.trip_blocks:
                    new *= blocks.get(name, spec.constexprs[name])
                    old *= spec.constexprs[name]
                out.append(dataclasses.replace(
                    spec, constexprs={**spec.constexprs, **blocks}, archs=tuple(archs),
                    num_warps=change.get("num_warps", spec.num_warps),
                    num_stages=change.get("num_stages", spec.num_stages),
                    trip_flops=spec.trip_flops * new // old,
                    trip_bytes=spec.trip_bytes * new // old))
    return out


# Pointer arguments whose tensors stay far below 2^31 elements for any real layer, so 32-bit
# offsets address them safely: the 16/256-entry code tables, the offset scalar, absmax2
# (N*K / (blocksize * 256) values), bias [N], lora_A [r <= 256, K] and lora_B [N, r] (K, N < 2^23),
# and a mixed batch's routing tables: one entry per row ([M], M itself an int32 argument), per
# rank column ([R <= 256]) or per adapter slot ([G <= 256]); the results shaped like A and B
# (dA, dB), the int32 arrival counters (one per tile of a launch, common.last_to_arrive) and
# the one-element dropout seed (dropout_seed).
# Every other pointer (x, dy, dx, y, U, dU, the packed weight, absmax, workspaces) must be
# addressed with at least one 64-bit offset: fastlora.compilecheck verifies it on the TTIR.
BOUNDED_ARGS = ("code_ptr", "code2_ptr", "offset_ptr", "absmax2_ptr", "bias_ptr", "a_ptr",
                "b_ptr", "row_seg_ptr", "col_seg_ptr", "col_scale_ptr", "seg_thr_ptr",
                "seg_keep_ptr", "da_ptr", "db_ptr", "counter_ptr", "seed_ptr")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel x config to compile ahead of time (fastlora.compile_report).

    signature: Triton type string per non-constexpr argument ("*fp16", "i32", ...);
    constexprs: the constexpr values (block sizes and feature flags) of this config;
    aligned: arguments a real launch specialises as multiples of 16 (pointers 16-byte aligned,
    extents and strides of real model shapes). Triton's launcher adds these divisibility hints
    itself when they hold; compiling without them models a misaligned launch, whose index math
    alone costs tens of registers.
    fma_dot: every tl.dot runs on fp32 operands at input_precision "ieee" (full fp32), which
    has no tensor-core instruction on sm_80/sm_90 and runs on the FMA units: the compile check
    expects NO HMMA/HGMMA for such a spec (one would mean tf32 rounding).
    trip_flops / trip_bytes: the unavoidable work of one trip of the kernel's main loop, for the
    compile report's hot-loop model (fastlora.compilecheck): tensor-core FLOPs of a GEMM trip
    (2 * BLOCK_M * BLOCK_N * BLOCK_K), or the HBM bytes a memory-bound trip must move; 0 where
    it does not apply. trip_blocks: the block sizes that work is the product of (with a
    constant), so a sibling fix that changes one of them rescales it (sibling_specs).
    ceiling_target: a headline config (what the GPU autotuner picks for Llama-3-8B's layers at
    M >= 4096): the modelled hot-loop ceiling it must reach; tests/test_ceilings.py fails below
    it, or when its SASS does not read the code table by warp shuffle. 0: not gated."""

    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    archs: tuple = ("sm_80", "sm_90")
    uses_dot: bool = True
    label: str = ""
    options: dict = field(default_factory=dict)
    aligned: tuple = ()
    bounded_args: tuple = BOUNDED_ARGS
    fma_dot: bool = False
    trip_flops: int = 0
    trip_bytes: int = 0
    trip_blocks: tuple = ()
    ceiling_target: float = 0.0
    not_for: tuple = ()  # sm_80 siblings that run another config instead (sibling_specs)

    @property
    def config(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        extra = f" {self.label}" if self.label else ""
        return f"{blocks} w{self.num_warps} s{self.num_stages}{extra}"


@triton.jit
def block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx, mask,
                 DOUBLE_QUANT: tl.constexpr, ROUNDED: tl.constexpr = False):
    """fp32 absmax of quantisation blocks `block_idx` (int64, any shape) where mask holds;
    elsewhere 0, or with DOUBLE_QUANT the offset (no select spent on it: every GEMM kernel
    multiplies the padded weight by a zero-padded operand; a kernel that sums the weight
    itself masks it, as dora._dora_norm_kernel does).

    ROUNDED (compiled GPU kernels only: PTX): the double-quant product and sum as explicitly
    rounded mul.rn / add.rn, which ptxas never fuses into an FMA, so a kernel compiled with
    enable_fp_fusion=True still decodes bitsandbytes' absmax bit for bit (gemv.py)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + q, mask=mask, other=0.0)
        a2 = tl.load(absmax2_ptr + block_idx // NESTED_BLOCK, mask=mask, other=0.0)
        if ROUNDED:
            scale = tl.inline_asm_elementwise(
                "{ .reg .f32 t; mul.rn.f32 t, $1, $2; add.rn.f32 $0, t, $3; }", "=r,r,r,r",
                [c2, a2, tl.zeros_like(c2) + tl.load(offset_ptr)], dtype=tl.float32,
                is_pure=True, pack=1)
        else:
            scale = c2 * a2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)
    return scale


@triton.jit
def lane_table(code_ptr, LANE_TABLE: tl.constexpr):
    """The 4-bit code table as the decoders read it, made once before a kernel's main loop.

    LANE_TABLE (compiled GPU kernels): every lane holds code[laneid % 16] as int32 bits, one
    load per thread, and code_lookup reads code[i] from lane i with one warp shuffle: no
    per-value gather through memory (which Triton stages as LDGSTS + LDS per value).
    Otherwise (Triton's CPU interpreter, which runs no PTX): code_ptr itself, and code_lookup
    gathers from it. Both give the same fp32 code values, bit for bit."""
    if LANE_TABLE:
        table = tl.inline_asm_elementwise(
            "{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; and.b32 l, l, 15; "
            "mad.wide.u32 a, l, 4, $1; ld.global.nc.b32 $0, [a]; }",
            "=r,l", [code_ptr.to(tl.int64)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        table = code_ptr
    return table


@triton.jit
def code_lookup(table, index, LANE_TABLE: tl.constexpr):
    """fp32 code[index & 15] for an int32 tensor `index` (bits above the low 4 may be set).

    LANE_TABLE: `shfl.sync.idx` takes its source lane from the index's low 5 bits, and lanes
    i and i + 16 hold the same entry, so index needs no masking (bit 4 picks either copy).
    Every lane of the warp must reach it (fastlora's kernels call it outside any branch)."""
    if LANE_TABLE:
        bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;",
                                         "=r,r,r", [table, index], dtype=tl.int32,
                                         is_pure=True, pack=1)
        code = bits.to(tl.float32, bitcast=True)
    else:
        code = tl.load(table + (index & 0xF))
    return code


@triton.jit
def word_nibbles(words):
    """The 8 nibbles of each int32 word of packed bytes, in weight order: [..., 2, 2, 2]
    reshaped to [..., 8] is value 8i + j of word i. Bytes are little-endian in the word and
    value 2b is the high nibble of byte b. Junk bits above each nibble's low 4 stay (shifts
    only, 7 per 8 values; code_lookup ignores them); every split is in-thread (tl.join)."""
    halves = tl.join(words, words >> 16)
    octets = tl.join(halves, halves >> 8)
    return tl.join(octets >> 4, octets)


@triton.jit
def decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                  flat_idx, mask, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                  LANE_TABLE: tl.constexpr):
    """fp32 values of weight elements at flattened indices `flat_idx` (int64, any shape):
    code[nibble] * absmax[flat_idx // QBLOCK]; where ~mask 0 (code * offset with
    DOUBLE_QUANT). The general per-element path (blocks straddling rows, odd K): each byte is
    read once per element that uses it (both nibbles of a byte sit next to each other, so the
    two reads hit the same cache line).
    table: lane_table(code_ptr, LANE_TABLE)."""
    byte = tl.load(packed_ptr + (flat_idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((flat_idx & 1) ^ 1).to(tl.int32) * 4  # even index -> high nibble
    code = code_lookup(table, byte >> shift, LANE_TABLE)
    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat_idx // QBLOCK,
                         mask, DOUBLE_QUANT)
    return code * scale  # where ~mask: 0, or code * offset with DOUBLE_QUANT (block_scales)


@triton.jit
def grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
    """(row tile, other tile) of program `pid` in the L2-friendly order of Triton tutorial 03:
    GROUP_M row tiles sweep the other dimension's tiles together, so the weight tiles they all
    need are decoded while still in L2 (read from HBM once per group, not once per row tile)."""
    per_group = GROUP_M * num_other
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def dropout_seed(seed_ptr, seed_hi):
    """The 64-bit dropout seed: its low word loaded from the device (seed_ptr: the op's int64
    [1] seed; little-endian, so the first 4 bytes), its high word `seed_hi` a launch argument.
    The word that varies per call (a fresh draw, so a CUDA graph replays a new mask: issue 30)
    lives on the device; the high word, 0 for every draw and a caller's explicit seed >> 32
    otherwise, stays a kernel parameter, so only one register holds the loaded part."""
    lo = tl.load(seed_ptr.to(tl.pointer_type(tl.uint32)))
    return (seed_hi.to(tl.uint64) << 32) | lo.to(tl.uint64)


@triton.jit
def dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUPED: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K]: keep element (m, k0 + j) of a [*, K] activation.

    Element offset i = m * K + k (int64) draws 16 bits: half i % 2 (low first) of word
    (i % 8) // 2 of tl.randint4x(seed, i // 8), kept when >= threshold (a 16-bit threshold:
    reference.dropout_threshold); fastlora.reference.dropout_draws reproduces it bit for bit.
    GROUPED (K % 8 == 0; k0 is a multiple of BLOCK_K >= 8): each group of 8 neighbours in a
    row is one Philox call, BLOCK_M x BLOCK_K / 8 calls a tile, the words split in registers
    (tl.join, in-thread); that is ~10 instructions an element where one tl.randint per element
    cost ~60. Otherwise every element makes its own call and picks its half-word (same bits)."""
    rows = offs_m.to(tl.int64)
    if GROUPED:
        calls = rows[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, calls)
        words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [.., 2, 2]: word 2 * c + d
        halves = tl.join(words & 0xFFFF, words >> 16)      # [.., 2, 2, 2]: draw 2 * word + h
        draw = tl.reshape(halves, (BLOCK_M, BLOCK_K))
    else:
        idx = rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, idx // 8)
        j = idx % 8
        word = tl.where(j < 4, tl.where(j < 2, w0, w1), tl.where(j < 6, w2, w3))
        draw = (word >> ((j & 1) * 16).to(tl.uint32)) & 0xFFFF
    return draw.to(tl.int64) >= threshold


@triton.jit
def segment_of_rows(row_seg_ptr, offs_m, M):
    """int32 [BLOCK_M]: each row's adapter slot in a mixed batch (-1: the base alone; rows past
    M read -1)."""
    return tl.load(row_seg_ptr + offs_m, mask=offs_m < M, other=-1)


@triton.jit
def row_dropout(seg, seg_thr_ptr, seg_keep_ptr):
    """([BLOCK_M, 1] int64 threshold, [BLOCK_M, 1] fp32 keep scale) of each row's adapter slot
    (seg: segment_of_rows; a base row reads slot 0's, which nothing it feeds uses)."""
    slot = tl.maximum(seg, 0)
    return (tl.load(seg_thr_ptr + slot).to(tl.int64)[:, None],
            tl.load(seg_keep_ptr + slot)[:, None])


@triton.jit
def segment_factor(seg, col_seg_ptr, col_scale_ptr, offs_r, R):
    """fp32 [BLOCK_M, BLOCK_R]: col_scale[r] where column r belongs to the row's adapter slot,
    else 0 (a mixed batch's rank columns are its adapters' ranks side by side)."""
    r_ok = offs_r < R
    col = tl.load(col_seg_ptr + offs_r, mask=r_ok, other=-2)
    scale = tl.load(col_scale_ptr + offs_r, mask=r_ok, other=0.0)
    return tl.where(seg[:, None] == col[None, :], scale[None, :], 0.0)


@triton.jit
def decode_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr,
                LANE_TABLE: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of deq(W): rows offs_n, columns k0 .. k0 + BLOCK_K - 1;
    outside N x K 0, or a finite junk value with DOUBLE_QUANT (block_scales). k0 must be a
    multiple of BLOCK_K; table: lane_table(code_ptr, ...).

    K_ALIGNED (K % QBLOCK == 0, true for every real layer; the launcher also requires the
    packed bytes 4-byte aligned): rows start on a 32-bit word and on a quantisation block, so
    the tile arrives as [BLOCK_N, BLOCK_K / 8] int32 words (8 values each, split in registers
    by word_nibbles), looked up in the register table, and scaled by one absmax per row and
    QBLOCK-wide sub-block. Per value that is ~1 shift, 1 shuffle, 1 FMUL and half a pack,
    against ~16 instructions for a byte load and a table gather. Otherwise (odd K, blocks
    straddling rows) every element finds its own byte and block: decode_weight."""
    row_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    if K_ALIGNED:
        tl.static_assert(BLOCK_K % 8 == 0, "8 values per 32-bit word")
        # Both powers of two: BLOCK_K covers SUB whole blocks, or lies inside one block.
        SUB: tl.constexpr = (BLOCK_K + QBLOCK - 1) // QBLOCK
        WORDS: tl.constexpr = BLOCK_K // 8
        word_ptr = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        word_col = tl.arange(0, WORDS)
        word_ok = row_ok[:, None] & ((k0 + 8 * word_col) < K)[None, :]
        words = tl.load(word_ptr + (rows * (K // 8) + k0 // 8)[:, None] + word_col[None, :],
                        mask=word_ok, other=0)
        code = tl.reshape(code_lookup(table, word_nibbles(words), LANE_TABLE),
                          (BLOCK_N, BLOCK_K))
        sub = tl.arange(0, SUB)
        block_idx = ((rows * K + k0) // QBLOCK)[:, None] + sub[None, :]
        block_ok = row_ok[:, None] & ((k0 + sub * QBLOCK) < K)[None, :]
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx,
                             block_ok, DOUBLE_QUANT)  # 0 (or the offset) outside N x K
        w = tl.reshape(tl.reshape(code, (BLOCK_N, SUB, BLOCK_K // SUB)) * scale[:, :, None],
                       (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        flat = rows[:, None] * K + offs_k[None, :]
        mask = row_ok[:, None] & (offs_k < K)[None, :]
        w = decode_weight(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table,
                          flat, mask, QBLOCK, DOUBLE_QUANT, LANE_TABLE)
    return w


@triton.jit
def load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] tile of x (its dtype), zero outside M x K; strides honoured
    (int64 offsets: a strided view can pass 2^31 elements)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = (x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
            + offs_k.to(tl.int64)[None, :] * stride_xk)
    return tl.load(ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def last_to_arrive(counter_ptr, parts):
    """Whether this program is the last of the `parts` programs that call this on the same
    int32 counter (zero before the first arrival): the one that then reduces their partials.
    Every thread's earlier stores are ordered before the arrival (a CTA barrier, then one
    acq_rel atomic at GPU scope), and the last program's later loads after all the others'
    arrivals. The last program puts the counter back to zero, so a launcher can hand the same
    counters to the next launch on its stream without clearing them (one launch fewer)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == parts - 1
    tl.store(counter_ptr, 0, mask=last)
    return last


# Rows (or columns) a program's in-kernel sum (sum_parts) takes at a time: a [16, R_PAD] tile
# keeps the sum's pointers and accumulator small next to what the main loop left live (whole
# [BLOCK, R_PAD] tiles spilled 8-168 B in du_db and da configs that fit without the sum).
SUM_ROWS = tl.constexpr(16)


@triton.jit
def sum_parts(part_ptrs, out_ptrs, part_stride, parts, scale, mask):
    """out = scale * (part 0 + part 1 + ... + part parts-1), in that order (deterministic: no
    atomics on the values), in fp32, rounded once to out's dtype. part_ptrs: a tile of fp32
    pointers into part 0; part j sits part_stride elements further on. The partials were
    written by other programs of this launch: read past L1 (.cg), which is not coherent
    across SMs."""
    acc = tl.zeros(part_ptrs.shape, dtype=tl.float32)
    for _ in range(0, parts):
        acc += tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        part_ptrs += part_stride  # 64-bit pointer steps
    tl.store(out_ptrs, (acc * scale).to(out_ptrs.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- config helpers

def m_bucket(m: int) -> int:
    """The autotune key's M: the next power of two, 32 .. 8192 (larger M reuses 8192's pick)."""
    return min(8192, max(32, triton.next_power_of_2(m)))


def weight_signature(double_quant: bool) -> dict:
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
            "code_ptr": "*fp32"}
