"""The compile report's hot-loop model (fastlora.compilecheck.hot_loop / hot_loop_model): the
main-loop finder and the per-trip arithmetic on small hand-written SASS listings whose answers
are counted by hand, and one real compile whose fields must agree with each other."""

import re

import pytest

from fastlora.compilecheck import (HOT_LOOP_FIELDS, _mio_clocks, compile_report, hot_loop,
                                   hot_loop_model)

# Two loops: [0x20, 0x50] holds the HGMMA (4 instructions: HGMMA, LDS.128, IADD3, BRA; MIO:
# LDS.128 = 4 clocks); [0x60, 0xa0] has more global loads but no MMA. The second encoding
# word of each instruction, as cuobjdump prints it, must not count.
TWO_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000ff00000000800 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;            /* 0x0000000404027981 */
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R88, R32, gdesc[UR20], R88 ;
        /*0030*/                   LDS.128 R4, [R2] ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/              @!P5 BRA 0x20 ;                              /* 0xfffffff000f4d947 */
        /*0060*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0070*/                   LDG.E.128 R12, desc[UR4][R6.64+0x10] ;
        /*0080*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0090*/                   FADD R3, R3, R8 ;
        /*00a0*/               @P0 BRA 0x60 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
        /*00d0*/                   NOP;
"""


@pytest.mark.quick
def test_main_loop_is_the_back_branch_region_holding_the_mma():
    loop = hot_loop(TWO_LOOPS)
    assert (loop["start"], loop["end"]) == (0x20, 0x50)
    assert loop["instructions"] == 4 and loop["mma"] == 1 and loop["mio_clocks"] == 4
    assert not loop["tf32"]


# Nested: outer [0x10, 0xa0] (unconditional back branch) around inner [0x30, 0x60]. All MMAs
# sit in the inner loop, so the inner one is the hot loop: 4 instructions (HMMA, HMMA, LDSM x4,
# BRA), MIO 4 (LDSM .x4 = 512 B).
NESTED = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   STS.128 [R0], R4 ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0040*/                   HMMA.16816.F32.BF16 R20, R12, R18, R20 ;
        /*0050*/                   LDSM.16.M88.4 R12, [R0] ;
        /*0060*/               @P1 BRA 0x30 ;
        /*0070*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0080*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0090*/                   ISETP.GE.AND P0, PT, R1, R5, PT ;
        /*00a0*/              @!P0 BRA 0x10 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""

# Nested the other way: the outer loop [0x0, 0x60] holds an MMA outside its inner wait loop
# [0x10, 0x20] (no MMA), so the outer one is the main loop: 7 instructions; MIO: SHFL.IDX 1.
NESTED_MMA_OUTSIDE = """
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3 ;
        /*0020*/              @!P0 BRA 0x10 ;
        /*0030*/                   SHFL.IDX PT, R5, R4, R6, 0x1f ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   VIADD R1, R1, 0x1 ;
        /*0060*/               @P2 BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_nested_loops_take_the_loop_where_the_mma_is():
    inner = hot_loop(NESTED)
    assert (inner["start"], inner["end"]) == (0x30, 0x60)
    assert inner["instructions"] == 4 and inner["mma"] == 2 and inner["mio_clocks"] == 4
    outer = hot_loop(NESTED_MMA_OUTSIDE)
    assert (outer["start"], outer["end"]) == (0x0, 0x60)
    assert outer["instructions"] == 7 and outer["mma"] == 1 and outer["mio_clocks"] == 1


# No MMA anywhere: the loop with the most global-memory instructions, [0x40, 0x80] (LDG, LDG,
# STG: 3 against 1), not [0x0, 0x30]. The unrolled copy [0x90, 0xe0] ties it on global
# instructions (3) and is the larger one: 6 instructions against 5; MIO LDG.E.64 2 + LDG.E.U8 1
# + RED 1 = 4.
MEMORY_LOOPS = """
        /*0000*/                   IMAD R1, R2, R3, RZ ;
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R5, R5, R4 ;
        /*0030*/               @P0 BRA 0x0 ;
        /*0040*/                   LDG.E.64 R6, desc[UR4][R2.64] ;
        /*0050*/                   LDG.E.U8 R8, desc[UR4][R2.64] ;
        /*0060*/                   STG.E desc[UR4][R2.64], R6 ;
        /*0070*/                   LDGDEPBAR ;
        /*0080*/               @P1 BRA 0x40 ;
        /*0090*/                   LDG.E.64 R6, desc[UR4][R2.64] ;
        /*00a0*/                   LDG.E.U8 R8, desc[UR4][R2.64] ;
        /*00b0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R6 ;
        /*00c0*/                   IADD3 R9, R9, 0x1, RZ ;
        /*00d0*/                   FADD R5, R5, R6 ;
        /*00e0*/              @!P1 BRA.U 0x90 ;
        /*00f0*/                   EXIT ;
"""


def test_without_mma_the_loop_with_most_global_memory_instructions_wins():
    loop = hot_loop(MEMORY_LOOPS)
    assert (loop["start"], loop["end"]) == (0x90, 0xe0)
    assert loop["instructions"] == 6 and loop["mio_clocks"] == 4 and loop["mma"] == 0


# No back branch (a forward predicated BRA only): the whole body up to the first unpredicated
# EXIT, 0x0 .. 0x70 = 8 instructions; the self-branch and NOP padding after it do not count.
# MIO: LDG.E.U8 1, LDGSTS.E.BYPASS.128 4, LDS 1, STG.E.128 4 = 10.
NO_LOOP = """
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/               @P0 BRA 0x40 ;
        /*0020*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0040*/                   LDS R8, [R3] ;
        /*0050*/               @P1 EXIT ;
        /*0060*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
        /*0090*/                   NOP;
        /*00a0*/                   NOP;
"""


def test_a_kernel_without_a_loop_counts_its_whole_body():
    loop = hot_loop(NO_LOOP)
    assert (loop["start"], loop["end"]) == (0x0, 0x70)
    assert loop["instructions"] == 8 and loop["mio_clocks"] == 10


@pytest.mark.quick
@pytest.mark.parametrize("opcode, clocks", [
    ("LDS", 1), ("LDS.128", 4), ("LDS.64", 2), ("STS.U16", 1), ("STS.128", 4),
    ("LDSM.16.M88.4", 4), ("LDSM.16.MT88.2", 2), ("LDSM.16.M88", 1), ("STSM.16.MT88.4", 4),
    ("SHFL.IDX", 1), ("LDGSTS.E.BYPASS.128", 4), ("LDGSTS.E.BYPASS.LTC128B.128", 4),
    ("LDGSTS.E", 1), ("LDG.E.U8", 1), ("LDG.E.128.CONSTANT", 4), ("STG.E.64", 2),
    ("ATOMS.ADD", 1), ("RED.E.ADD.F32.FTZ.RN.STRONG.GPU", 1),
    ("IMAD.WIDE", 0), ("LDGDEPBAR", 0), ("BAR.SYNC.DEFER_BLOCKING", 0), ("LDC.64", 0),
    ("HGMMA.64x128x16.F32.BF16", 0)])
def test_mio_clocks_at_128_bytes_per_clock(opcode, clocks):
    assert _mio_clocks(opcode) == clocks


def test_tf32_mma_is_recognised():
    sass = TWO_LOOPS.replace("HGMMA.64x128x16.F32.BF16", "HGMMA.64x64x8.F32.TF32")
    assert hot_loop(sass)["tf32"]


@pytest.mark.quick
def test_model_arithmetic_for_a_gemm_trip():
    # the example: 506 instructions, 167 MIO clocks per warp, 8 warps, 128x128x64
    loop = {"instructions": 506, "mio_clocks": 167, "tf32": False}
    row = hot_loop_model(loop, "sm_90", 8, trip_flops=2 * 128 * 128 * 64)
    assert row["loop_instructions"] == 506
    assert row["issue_clocks"] == 1012  # 506 * 8 / 4
    assert row["mio_clocks"] == 1336  # 167 * 8
    assert row["mma_clocks"] == 512  # 2097152 / 4096
    assert row["bound"] == "mma"
    assert row["ceiling"] == pytest.approx(512 / 1336)
    # sm_80: half the dense rate, so the same trip owns 1024 MMA clocks; issue-bound there
    loop80 = {"instructions": 400, "mio_clocks": 100, "tf32": False}
    row = hot_loop_model(loop80, "sm_80", 8, trip_flops=2 * 128 * 128 * 64)
    assert row["mma_clocks"] == 1024 and row["issue_clocks"] == 800
    assert row["ceiling"] == 1.0  # 1024 / 800, capped: a share of peak
    # tf32 MMAs run at half the bf16 rate: 2*64*64*32 / 1024
    row = hot_loop_model({**loop80, "tf32": True}, "sm_80", 4, trip_flops=2 * 64 * 64 * 32)
    assert row["mma_clocks"] == 256 and row["ceiling"] == pytest.approx(256 / 400)


@pytest.mark.quick
def test_model_arithmetic_for_a_memory_bound_trip():
    # dequant-like: 308 instructions and 49 MIO clocks per warp at 4 warps, 2560 bytes a trip;
    # H100: 3.35e12 B/s / 132 SMs / 1.83e9 Hz = 13.87 B per SM clock -> 184.6 clocks of HBM
    loop = {"instructions": 308, "mio_clocks": 49, "tf32": False}
    row = hot_loop_model(loop, "sm_90", 4, trip_bytes=2560)
    assert (row["issue_clocks"], row["mio_clocks"], row["mma_clocks"]) == (308, 196, 0)
    assert row["bound"] == "hbm"
    assert row["ceiling"] == pytest.approx(184.6 / 308, rel=1e-3)
    # A100: 2.04e12 / 108 / 1.41e9 = 13.40 B per SM clock; MIO-bound here (50 * 4 > 100)
    row = hot_loop_model({**loop, "instructions": 100, "mio_clocks": 50}, "sm_80", 4,
                         trip_bytes=1000)
    assert row["ceiling"] == pytest.approx(1000 / 13.397 / 200, rel=1e-3)
    # more HBM time than issue and MIO time: the loop can keep up with HBM, ceiling 1
    assert hot_loop_model(loop, "sm_90", 4, trip_bytes=65536)["ceiling"] == 1.0


def test_model_has_no_ceiling_for_fma_dots_or_without_trip_work():
    loop = {"instructions": 100, "mio_clocks": 10, "tf32": False}
    fma = hot_loop_model(loop, "sm_90", 4, trip_flops=2 * 64 * 64 * 64, fma_dot=True)
    assert fma["ceiling"] is None and fma["bound"] is None and fma["mma_clocks"] is None
    assert fma["issue_clocks"] == 100  # the loop is still costed
    none = hot_loop_model(loop, "sm_90", 4)
    assert none["ceiling"] is None and none["bound"] is None


def test_compiled_rows_carry_a_consistent_hot_loop_model():
    """One memory-bound kernel with a loop (DoRA's column dot: a [16, 128] tile of g and of z
    a trip) and one without (dequant), compiled for both archs: every row has the fields and
    they agree."""
    rows = compile_report(archs=("sm_80", "sm_90"),
                          kernels=["_col_dot_kernel", "_dequant_4bit_kernel"])
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in ("_col_dot_kernel", "_dequant_4bit_kernel")
        for a in ("sm_80", "sm_90")}
    hbm = {"sm_90": 3.35e12 / 132 / 1.83e9, "sm_80": 2.04e12 / 108 / 1.41e9}
    for row in rows:
        assert set(HOT_LOOP_FIELDS) <= set(row)
        warps = int(re.search(r"\bw(\d+)\b", row["config"]).group(1))
        assert row["loop_instructions"] > 0
        assert row["issue_clocks"] == row["loop_instructions"] * warps / 4
        assert row["mio_clocks"] > 0 and row["mio_clocks"] % warps == 0  # loads in the loop
        assert row["mma_clocks"] == 0 and row["bound"] == "hbm"
        if row["kernel"] == "_col_dot_kernel":  # COL_BLOCK_M x EW_BLOCK_N of g and of z
            trip = 2 * 16 * 128 * (4 if row["config"].startswith("fp32") else 2)
        else:  # BLOCK = 1024 values: 512 packed bytes read, 1024 values written
            out = re.search(r"out=(\w+)", row["config"]).group(1)
            trip = 512 + 1024 * (4 if out == "fp32" else 2)
        busy = max(row["issue_clocks"], row["mio_clocks"])
        assert row["ceiling"] == pytest.approx(min(1.0, trip / hbm[row["arch"]] / busy))


# issue 28: the wgmma's own shared-memory operand reads. Per instruction and warpgroup:
#   HGMMA.64x256x16.F32.BF16 R24, R168, gdesc..   A in registers: B = 256*16*2 = 8192 B
#   HGMMA.64x128x16.F32.BF16 R88, gdesc.., RZ     A by descriptor: B 128*16*2 = 4096 B + A
#                                                 64*16*2 = 2048 B = 6144 B
#   HGMMA.64x64x8.F32.TF32 R8, gdesc..            tf32 (4 B): B 64*8*4 = 2048 + A 64*8*4 = 2048
#   HGMMA.64x128x32.F32.E4M3.E4M3 R8, R40, gdesc.. fp8, A in registers: 128*32*1 = 4096 B
@pytest.mark.quick
@pytest.mark.parametrize("line,want", [
    ("HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR20], R24", 8192),
    ("HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR20], R24, gsb0", 8192),
    ("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT, gsb0", 6144),
    ("HGMMA.64x128x16.F32 R88, gdesc[UR8], R88", 6144),  # fp16: no operand type suffix
    ("HGMMA.64x128x16.F32.XF9 R88, gdesc[UR8], R88", None),  # unknown type: an error
    ("HGMMA.64x64x8.F32.TF32 R8, gdesc[UR4], R8", 4096),
    ("HGMMA.64x128x32.F32.E4M3.E4M3 R8, R40, gdesc[UR12], R8", 4096),
    ("HMMA.16816.F32.BF16 R4, R8, R12, R4", 0),  # sm_80: operands from registers
    ("LDS.128 R4, [R2]", 0),
], ids=["bf16-regA", "bf16-regA-gsb0", "bf16-descA", "fp16-descA", "unknown-type",
        "tf32-descA", "fp8-regA",
        "hmma", "lds"])
def test_wgmma_smem_bytes_by_hand(line, want):
    from fastlora.compilecheck import wgmma_smem_bytes

    opcode, _, operands = line.partition(" ")
    if want is None:
        with pytest.raises(ValueError, match="type"):
            wgmma_smem_bytes(opcode, operands)
    else:
        assert wgmma_smem_bytes(opcode, operands) == want


# The headline forward, by hand: per warp a trip holds 4 register-A HGMMA.64x256x16
# (and here one LDS.128 and one UTMALDG-free BRA); 8 warps are 2 warpgroups.
WGMMA_LOOP = """
        /*0100*/                   HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR20], R24 ;
        /*0110*/                   HGMMA.64x256x16.F32.BF16 R24, R172, gdesc[UR24], R24 ;
        /*0120*/                   HGMMA.64x256x16.F32.BF16 R24, R176, gdesc[UR28], R24 ;
        /*0130*/                   HGMMA.64x256x16.F32.BF16 R24, R180, gdesc[UR32], R24, gsb0 ;
        /*0140*/                   LDS.128 R4, [R2] ;
        /*0150*/              @P0  BRA 0x100 ;
        /*0160*/                   EXIT ;
"""


@pytest.mark.quick
def test_wgmma_operand_reads_take_the_shared_memory_pipe():
    loop = hot_loop(WGMMA_LOOP)
    assert loop["wgmma_smem_bytes"] == 4 * 8192 and loop["mio_clocks"] == 4  # LDS.128
    assert loop["tma_loads"] == 0
    row = hot_loop_model(loop, "sm_90", 8, trip_flops=2 * 256 * 128 * 64)
    # own traffic 4 clocks x 8 warps = 32; operands 32768 B x 2 warpgroups / 128 B = 512
    assert row["mio_loop_clocks"] == 32 and row["mio_mma_clocks"] == 512
    assert row["mio_clocks"] == 544
    assert row["mma_clocks"] == 1024 and row["ceiling"] == 1.0  # 1024 / max(12, 544)
    # at 4 warps: one warpgroup, 256 clocks of operands
    assert hot_loop_model(loop, "sm_90", 4, trip_flops=1)["mio_mma_clocks"] == 256


TMA_LOOP = """
        /*0100*/                   UTMALDG.2D [UR8], [UR14] ;
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0120*/              @P0  BRA 0x100 ;
"""


@pytest.mark.quick
def test_tma_copies_in_the_loop_are_counted_and_reported():
    """A TMA copy writes shared memory with no LSU instruction and no size in its SASS: the
    model counts it and the report names it a problem rather than leave its bytes out."""
    from fastlora.compilecheck import problems

    loop = hot_loop(TMA_LOOP)
    assert loop["tma_loads"] == 1 and loop["wgmma_smem_bytes"] == 6144
    row = {"kernel": "k", "config": "c", "arch": "sm_90", "registers": 100, "stack_bytes": 0,
           "local_bytes": 0, "shared_bytes": 0, "mma_instructions": 1, "uses_dot": True,
           **hot_loop_model(loop, "sm_90", 4, trip_flops=2 * 64 * 128 * 16)}
    assert row["mio_mma_clocks"] == 6144 / 128
    assert any("TMA" in p for p in problems([row]))


# sm_100 (issue 31): a trip of the tiled forward as Triton 3.9 compiles it for B200, cut down.
# The decoded weight tile goes to tensor memory (STTM.x8: 32 lanes x 8 registers x 4 B = 1 KB,
# 8 clocks), two UTCHMMAs take it as A from tensor memory and x as B by descriptor; their
# descriptor 0x8400490 (set by the UMOV above them) reads A type 1 (bf16), N >> 3 = 32, M >> 4
# = 8: 128 x 256 x 16, so B = 256 x 16 x 2 = 8192 B from shared memory each, once per block.
# Past the EXIT, the out-of-line mbarrier wait branches back into the body (to 0x110): no
# loop, else [0x110, 0x1b0] would enclose the real one [0x120, 0x180] and, with the peeled
# first trip's UTCHMMA at 0x110, hold more MMAs than it.
SM100_LOOP = """
        /*0100*/                   UMOV UR13, 0x8400490 ;
        /*0110*/                   UTCHMMA tmem[UR18], gdesc[UR4], tmem[UR8], tmem[UR14], idesc[UR13], UPT ;
        /*0120*/                   LDSM.16.M88 R38, [R8+0xd000] ;
        /*0130*/                   SHFL.IDX PT, R55, R150, R6, 0x1f ;
        /*0140*/                   STTM.x8 tmem[UR9+0x100], R4 ;
        /*0150*/                   UTCHMMA tmem[UR18], gdesc[UR10], tmem[UR8], tmem[UR14], idesc[UR13], UPT ;
        /*0160*/                   UTCHMMA tmem[UR6], gdesc[UR12], tmem[UR8], tmem[UR14], idesc[UR13], UPT ;
        /*0170*/                   UTCBAR [UR16], URZ ;
        /*0180*/              @!P4 BRA 0x120 ;
        /*0190*/                   EXIT ;
        /*01a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR16], R20 ;
        /*01b0*/                   BRA 0x110 ;
        /*01c0*/                   BRA 0x1c0;
"""


@pytest.mark.quick
def test_sm100_tcgen05_loop_by_hand():
    loop = hot_loop(SM100_LOOP)
    assert (loop["start"], loop["end"]) == (0x120, 0x180)
    assert loop["instructions"] == 7 and loop["mma"] == 2 and not loop["tf32"]
    assert loop["mio_clocks"] == 1 + 1 + 8  # LDSM, SHFL, STTM.x8
    assert loop["tcgen05_smem_bytes"] == 2 * 8192 and loop["wgmma_smem_bytes"] == 0
    # 8 warps: own traffic 10 x 8 = 80 clocks; operands once per block 16384 / 128 = 128;
    # the trip's 2 x 128 x 256 x 32 FLOP at B200's 8192 per clock: 256 clocks
    row = hot_loop_model(loop, "sm_100", 8, trip_flops=2 * 128 * 256 * 32)
    assert (row["mio_loop_clocks"], row["mio_mma_clocks"], row["mio_clocks"]) == (80, 128, 208)
    assert row["issue_clocks"] == 14 and row["mma_clocks"] == 256 and row["ceiling"] == 1.0
    row = hot_loop_model({**loop, "mio_clocks": 60}, "sm_100", 8, trip_flops=2 * 128 * 256 * 32)
    assert row["ceiling"] == pytest.approx(256 / (480 + 128))


# A tf32 descriptor, by hand: D f32 (bit 4), A and B tf32 (type 2 in bits 7-9 and 10-12),
# N = 64 (8 << 17), M = 64 (4 << 24) = 0x4100910; K = 32 B / 4 B = 8; A by descriptor too:
# (64 x 8 + 64 x 8) x 4 B = 4096 B. Hoisted out of the loop, the UMOV still names it.
SM100_TF32 = """
        /*0000*/                   UMOV UR15, 0x4100910 ;
        /*0010*/                   UMOV UR16, 0x8400490 ;
        /*0020*/                   UTCHMMA gdesc[UR4], gdesc[UR10], tmem[UR8], tmem[UR14], idesc[UR15], UPT ;
        /*0030*/                   LDTM.16dp32bit_t0_t15.x32 R4, tmem[UR22] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   EXIT ;
"""


@pytest.mark.quick
def test_sm100_descriptor_shape_and_type_by_hand():
    from fastlora.compilecheck import _SASS_LINE, tcgen05_shape

    loop = hot_loop(SM100_TF32)
    assert loop["tf32"] and loop["tcgen05_smem_bytes"] == 4096
    assert loop["mio_clocks"] == 16  # 16 lanes x 32 registers x 4 B / 128
    code = [(int(a, 16), bool(p), op, args) for a, p, op, args in _SASS_LINE.findall(SM100_TF32)]
    assert tcgen05_shape(code, 2) == {"m": 64, "n": 64, "k": 8, "tf32": True,
                                      "smem_bytes": 4096}
    # no UMOV for its idesc register: the shape is not static, refused
    with pytest.raises(ValueError, match="UMOV UR15"):
        hot_loop(SM100_TF32.replace("UMOV UR15", "UMOV UR17"))


@pytest.mark.quick
@pytest.mark.parametrize("opcode, clocks", [
    ("STTM.x8", 8), ("LDTM.x128", 128), ("LDTM.16dp32bit_t16_t31.x32", 16),
    ("STTM.16dp32bit_t0_t15.x2", 1), ("STTM.16dp256bit.x4", None)])
def test_sm100_tensor_memory_moves(opcode, clocks):
    if clocks is None:
        with pytest.raises(ValueError, match="unknown tensor-memory move"):
            _mio_clocks(opcode)
    else:
        assert _mio_clocks(opcode) == clocks
