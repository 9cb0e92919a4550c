"""Every shipped kernel config compiles ahead of time for sm_80 and sm_90 on this CPU machine
with zero spill bytes, and with tensor-core instructions wherever it calls tl.dot (except
full-precision fp32 'ieee' configs, which must have none: they run on the FMA units)."""

import json

import pytest

import fastlora
from fastlora.compilecheck import FIELDS, format_table, problems, report_jobs
from fastlora.compilerecord import load_record, recorded_report, spec_key

RECHECK_SLICES = 16  # each run recompiles 1/16 of the recorded rows (~30 of ~500)


# One report per run, read from the committed compile record where its keys match (fastlora/
# compilerecord.py) and compiled where they don't; slice rotation() % 16 of the recorded rows is
# recompiled and compared with the record. README's test command runs pytest-xdist with
# --dist loadfile, so one worker builds it for every test of this module.
@pytest.fixture(scope="module")
def report(rotation):
    rows = recorded_report(archs=("sm_80", "sm_90"),
                           recheck=(rotation % RECHECK_SLICES, RECHECK_SLICES))
    compiled = sum(r["source"] == "compiled" for r in rows)
    print(f"compile report: {len(rows)} rows, {compiled} compiled (record recheck slice "
          f"{rotation % RECHECK_SLICES}/{RECHECK_SLICES}), {len(rows) - compiled} from the record")
    return rows


@pytest.mark.quick
def test_compiled_rows_agree_with_the_record(report):
    """Every recompiled row that the record also holds says what the record says: a record
    that no longer tells the truth (a compile that changed under the same key) fails here."""
    bad = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['record_mismatch']}"
           for r in report if r.get("record_mismatch")]
    assert not bad, ("rows differ from fastlora/data/compile_record.json (rewrite it with "
                     "`fastlora compile-report --write-record`):\n" + "\n".join(bad))
    assert any(r["source"] == "compiled" for r in report), "nothing recompiled: no check ran"


def test_the_record_is_current():
    """The committed record holds every shipped config on the pinned toolchain, so CI compiles
    only its recheck slice. A kernel change without `fastlora compile-report --write-record`
    fails here (the gates above still ran: on a compiled report)."""
    import triton

    from fastlora.support import CHECKED_TRITONS

    if triton.__version__ != CHECKED_TRITONS[-1]:
        pytest.skip(f"the record is kept for the pinned Triton {CHECKED_TRITONS[-1]}, this is "
                    f"{triton.__version__}")
    recorded = load_record()
    missing = [f"{spec.kernel} [{spec.config}] {arch}"
               for spec, arch in report_jobs(("sm_80", "sm_90"))
               if spec_key(spec, arch) not in recorded]
    assert not missing, (f"{len(missing)} shipped configs are not in the compile record: run "
                         "`fastlora compile-report --write-record`\n" + "\n".join(missing[:20]))


def test_record_mismatch_names_the_fields(monkeypatch, tmp_path):
    """A planted wrong record row is recompiled (slice 0 of 1: every row) and flagged by field;
    an unchanged one is not."""
    from fastlora import compilerecord

    kernel = "_dequant_4bit_kernel"
    truth = recorded_report(("sm_90",), kernels=[kernel], record=False)
    jobs = report_jobs(("sm_90",), kernels=[kernel])
    rows = {spec_key(spec, arch): {k: v for k, v in row.items() if k != "source"}
            for (spec, arch), row in zip(jobs, truth)}
    first = next(iter(rows))
    rows[first] = {**rows[first], "registers": rows[first]["registers"] + 1}
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(compilerecord, "RECORD_PATH", path)
    got = recorded_report(("sm_90",), kernels=[kernel], recheck=(0, 1))
    assert [r["record_mismatch"] for r in got] == [["registers"]] + [[]] * (len(got) - 1)
    assert all(r["source"] == "compiled" for r in got)
    # without a recheck slice every row comes from the (planted) record, unchecked
    got = recorded_report(("sm_90",), kernels=[kernel])
    assert all(r["source"] == "record" for r in got)
    assert got[0]["registers"] == truth[0]["registers"] + 1


def test_report_rows_have_the_documented_fields(report):
    assert report, "no kernel configs were compiled"
    for row in report:
        assert set(FIELDS) <= set(row)
        assert row["registers"] > 0


@pytest.mark.quick  # the report is built anyway (the record check): the gate costs nothing
def test_no_shipped_config_spills_or_misses_tensor_cores(report):
    found = problems(report)
    assert not found, "\n".join(found) + "\n\n" + format_table(report)


@pytest.mark.parametrize("kernel", ["_dequant_4bit_kernel"])
def test_kernel_is_compiled_for_both_archs(report, kernel):
    archs = {row["arch"] for row in report if row["kernel"] == kernel}
    assert archs == {"sm_80", "sm_90"}, f"{kernel} compiled for {sorted(archs)}"


def test_problems_flags_spills_and_missing_mma():
    row = {"kernel": "k", "config": "c", "arch": "sm_90", "registers": 255, "stack_bytes": 16,
           "local_bytes": 0, "shared_bytes": 0, "mma_instructions": 0, "uses_dot": True}
    found = problems([row])
    assert len(found) == 2 and "spills" in found[0] and "tensor-core" in found[1]


def test_problems_flags_shared_memory_past_the_arch_limit():
    """155,648 B (the fp32 U kernel's 32 x 256 x 64 tile, 3 stages) fits sm_80's 163 KB a block
    and not the 99 KB of sm_86 / sm_89 / sm_120."""
    row = {"kernel": "k", "config": "c", "arch": "sm_80", "registers": 128, "stack_bytes": 0,
           "local_bytes": 0, "shared_bytes": 155_648, "mma_instructions": 4, "uses_dot": True}
    assert problems([row]) == []
    for arch in ("sm_86", "sm_89", "sm_120"):
        found = problems([{**row, "arch": arch}])
        assert len(found) == 1 and "101376 B" in found[0], found
    assert problems([{**row, "arch": "sm_86", "shared_bytes": 101_376}]) == []


def test_problems_expects_no_mma_in_full_precision_fp32_configs():
    """fp32 tl.dot at input_precision 'ieee' has no tensor-core form: no MMA is right there
    (and only there), and an MMA would mean tf32 rounding."""
    row = {"kernel": "k", "config": "c ieee", "arch": "sm_90", "registers": 128,
           "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 0, "mma_instructions": 0,
           "uses_dot": True, "fma_dot": True}
    assert problems([row]) == []
    found = problems([{**row, "mma_instructions": 4}])
    assert len(found) == 1 and "tf32" in found[0]
    assert "tensor-core" in problems([{**row, "fma_dot": False}])[0]


def test_full_precision_fp32_configs_are_in_the_report(report):
    """Every kernel taking a dot precision ships configs compiled at PRECISION='ieee' for both
    archs (torch's default fp32 matmul precision asks for it); the report covers them."""
    fma = {(r["kernel"], r["arch"]) for r in report if r["fma_dot"]}
    kernels = {"_nf4_lora_fwd_kernel", "_lora_u_kernel", "_nf4_lora_fwd_small_m_kernel",
               "_nf4_lora_bwd_dx_kernel", "_lora_bwd_du_db_kernel",
               "_lora_bwd_da_kernel", "_lora_u_group_kernel", "_lora_bwd_da_group_kernel"}
    assert fma == {(k, arch) for k in kernels for arch in ("sm_80", "sm_90")}
    assert all("ieee" in r["config"] and r["mma_instructions"] == 0
               for r in report if r["fma_dot"])


SASS_HGMMA = """
        /*3fd0*/                   HGMMA.64x128x16.F32.BF16 R88, R32, gdesc[UR20], R88 ;
        /*4010*/                   HGMMA.64x128x16.F32.BF16 R88, R36, gdesc[UR20], R88, gsb0 ;
        /*4a70*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*4b00*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
"""


def test_hgmma_register_a_counts_the_register_operand_form():
    from fastlora.compilecheck import hgmma_register_a

    assert hgmma_register_a(SASS_HGMMA) == 2  # the gdesc-A form and sm_80 HMMA do not count


# The kernels whose sm_90 configs compute a transposed tile so that the decoded weight tile is
# tl.dot's FIRST operand, which wgmma then reads from registers (DESIGN.md, "Compilation").
REGISTER_A_KERNELS = ("_nf4_lora_fwd_kernel", "_nf4_lora_bwd_dx_kernel")


@pytest.mark.parametrize("kernel", REGISTER_A_KERNELS)
def test_sm90_wgmma_takes_the_decoded_weight_tile_from_registers(report, kernel):
    """SASS `HGMMA.64x128x16.F32.BF16 R88, R32, gdesc[..]`: A from registers, no shared-memory
    round trip for the decoded weight. In dx every HGMMA is that one product but, in the
    16-bit K-aligned configs (LORA), the prologue's one dU @ A (both operands loads); the
    forward adds the LoRA epilogue's B @ U^T, whose operands are both loads (shared-memory A),
    so there the register form need only be present. Full-precision fp32 configs have no
    HGMMA."""
    rows = [r for r in report
            if r["kernel"] == kernel and r["arch"] == "sm_90" and not r["fma_dot"]]
    assert rows, f"no sm_90 configs of {kernel} in the report"
    if kernel == "_nf4_lora_bwd_dx_kernel":
        def prologue(r):  # csrc_triton/backward.py _dx_spec: LORA where k_aligned and 16-bit
            return int("k_aligned=1" in r["config"] and " fp32 " not in r["config"])
        bad = [r for r in rows
               if r["mma_instructions"] - r["hgmma_register_a"] != prologue(r)]
    else:
        bad = [r for r in rows if r["hgmma_register_a"] == 0]
    assert not bad, "\n".join(f"{r['config']}: {r['hgmma_register_a']} register-A HGMMA of "
                              f"{r['mma_instructions']}" for r in bad)


SYNTHETIC_ATOMICS_TTIR = """
    %2 = tt.atomic_rmw fadd, acq_rel, gpu, %1, %v, %m : (tensor<128x!tt.ptr<f32>>, ...)
    %4 = tt.atomic_cas acq_rel, gpu, %3, %c0, %c1 : (!tt.ptr<f32>, f32, f32) -> f32
    tt.store %p, %v : tensor<128x!tt.ptr<f32>>
"""
SYNTHETIC_ATOMICS_PTX = """
	.loc	1 6 0                           // atomics.py:6:0
	@%p1 atom.global.gpu.acq_rel.add.f32 %r1, [ %rd2 + 0 ], %r2;
	@%p2 red.global.gpu.relaxed.max.s32 [ %rd3 + 0 ], %r2;
	st.global.v4.b32 [ %rd4 + 0 ], { %r5, %r6, %r7, %r8 };
"""


def test_atomic_ops_counts_ttir_and_ptx_atomics():
    """What tl.atomic_add / atomic_max / atomic_cas compile to (triton 3.9): TTIR
    tt.atomic_rmw / tt.atomic_cas, PTX atom.* / red.* (predicated or not)."""
    from fastlora.compilecheck import atomic_ops

    assert atomic_ops(SYNTHETIC_ATOMICS_TTIR, SYNTHETIC_ATOMICS_PTX) == 4
    assert atomic_ops("tt.store %p, %v", "\tst.global.b32 [ %rd4 + 0 ], %r5;") == 0
    # on floats: the fadd and the f32 cas (TTIR), the f32 atom (PTX); not the s32 red
    assert atomic_ops(SYNTHETIC_ATOMICS_TTIR, SYNTHETIC_ATOMICS_PTX, floating=True) == 3
    counter = ("%5 = tt.atomic_rmw add, acq_rel, gpu, %4, %c1_i32, %true : (!tt.ptr<i32>, i32, "
               "i1) -> i32", "\t@%p7 atom.global.gpu.acq_rel.add.u32 %r9, [ %rd5 + 0 ], %r10;")
    assert atomic_ops(*counter) == 2 and atomic_ops(*counter, floating=True) == 0
    assert atomic_ops("", "\tred.global.add.noftz.bf16x2 [ %rd1 + 0 ], %r2;", floating=True) == 1


# Kernels whose sums over splits must be deterministic. The first three finish them in-kernel:
# the last program of a tile to arrive at an integer counter adds the partials in order.
ARRIVING_KERNELS = {"_lora_bwd_du_db_kernel", "_lora_bwd_da_kernel",
                    "_lora_bwd_da_group_kernel", "_nf4_lora_fwd_small_m_kernel",
                    "_lora_bwd_du_db_group_kernel"}
BACKWARD_KERNELS = {"_lora_bwd_du_db_kernel", "_nf4_lora_bwd_dx_kernel", "_lora_bwd_da_kernel",
                    "_lora_bwd_da_group_kernel", "_nf4_lora_fwd_small_m_kernel",
                    "_lora_bwd_du_db_group_kernel"}


def test_backward_kernels_have_no_float_atomics(report):
    """dB and dA (and the small-M forward's split-K sum) are deterministic ("same inputs give
    bit-identical dB") because partials are summed in a fixed order and never accumulated
    through atomics. The interpreter runs programs one after another, so a run-twice test
    there cannot see an atomic's varying order: check the compiled TTIR and PTX of every
    shipped config instead. The in-kernel sums do use atomics, on int32 arrival counters only
    (csrc_triton/common.py last_to_arrive): every config that splits has some; the rest none."""
    rows = [r for r in report if r["kernel"] in BACKWARD_KERNELS]
    assert {r["kernel"] for r in rows} == BACKWARD_KERNELS
    bad = [r for r in rows if r["float_atomics"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['config']}] {r['arch']}: "
                              f"{r['float_atomics']} float atomic operations" for r in bad)
    for r in rows:
        splits = r["kernel"] in ARRIVING_KERNELS and "split=0" not in r["config"]
        assert (r["atomics"] > 0) == splits, (r["kernel"], r["config"], r["arch"], r["atomics"])


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="arch"):
        fastlora.compile_report(archs=("sm_75",))


SYNTHETIC_TTIR = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"(#loc)), %code_ptr: !tt.ptr<f32> loc("c"(#loc)), %M: i32) {
    %rows = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>>
    %offs = arith.muli %r, %s : tensor<64xi32>
    %ptrs = tt.addptr %rows, %offs : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>
    %v = tt.load %ptrs : tensor<64x!tt.ptr<bf16>>
    %wide = arith.extsi %offs : tensor<64xi32> to tensor<64xi64>
    %ptrs2 = tt.addptr %rows, %wide : tensor<64x!tt.ptr<bf16>>, tensor<64xi64>
    %ptrs3 = tt.addptr %ptrs2, %offs : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>
    %w = tt.load %ptrs3 : tensor<64x!tt.ptr<bf16>>
    %c = tt.splat %code_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>>
    %cp = tt.addptr %c, %offs : tensor<64x!tt.ptr<f32>>, tensor<64xi32>
    tt.store %cp, %v : tensor<64x!tt.ptr<f32>>
"""


def test_large_index_check_finds_32bit_only_addressing():
    """The TTIR check behind the `i32_addressed` column: a load through a 32-bit row offset is
    flagged, one with a 64-bit offset anywhere on its pointer's path is not."""
    from fastlora.compilecheck import narrow_pointer_args

    assert narrow_pointer_args(SYNTHETIC_TTIR) == {"x_ptr", "code_ptr"}
    only_wide = SYNTHETIC_TTIR.replace(  # the first load's offset made 64-bit
        "%ptrs = tt.addptr %rows, %offs : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>",
        "%ptrs = tt.addptr %rows, %offs64 : tensor<64x!tt.ptr<bf16>>, tensor<64xi64>")
    assert narrow_pointer_args(only_wide) == {"code_ptr"}


SIBLING_LOOPS_TTIR = """
  tt.func public @k(%a_ptr: !tt.ptr<f32> loc("a"(#loc)), %b_ptr: !tt.ptr<f32> loc("b"(#loc))) {
    scf.for %i = %c0 to %n step %c1  : i32 {
      %7 = tt.splat %a_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>>
      %8 = tt.addptr %7, %wide : tensor<64x!tt.ptr<f32>>, tensor<64xi64>
      tt.store %8, %v : tensor<64x!tt.ptr<f32>>
    }
    scf.for %j = %c0 to %n step %c1  : i32 {
      %8 = arith.mulf %x, %y : tensor<64xf32>
      %5 = tt.splat %b_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>>
      %6 = tt.addptr %5, %narrow : tensor<64x!tt.ptr<f32>>, tensor<64xi32>
      tt.store %6, %8 : tensor<64x!tt.ptr<f32>>
    }
"""


def test_pointer_trace_follows_the_definition_in_scope():
    """Sibling loops may reuse an SSA name (%8 here: a pointer in the first loop, a value in
    the second); each access is traced through the definition above it."""
    from fastlora.compilecheck import pointer_accesses

    assert pointer_accesses(SIBLING_LOOPS_TTIR) == [("tt.store", "a_ptr", True),
                                                    ("tt.store", "b_ptr", False)]


def test_every_large_tensor_is_addressed_with_64bit_offsets(report):
    """Issue 7 item 4 statically: x, y, dy, dx, U, dU, packed weight, absmax and workspaces
    reach their pointers through an int64 offset in every shipped kernel config (tests in
    tests/test_large_index.py show it at run time)."""
    bad = [r for r in report if r["i32_addressed"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['config']}] {r['arch']}: {r['i32_addressed']}"
                              for r in bad)


def test_code_table_loads_counts_loads_of_the_code_table_only():
    """The check behind "no gather of the code table": loads traced back to code_ptr."""
    from fastlora.compilecheck import code_table_loads

    assert code_table_loads(SYNTHETIC_TTIR) == 0  # code_ptr is only stored to there
    gather = SYNTHETIC_TTIR.replace("tt.store %cp, %v :", "%g = tt.load %cp :")
    assert code_table_loads(gather) == 1


HEADLINE = {"_nf4_lora_fwd_kernel": 0.85, "_nf4_lora_bwd_dx_kernel": 0.85,
            "_dequant_4bit_kernel": 0.80, "_nf4_lora_fwd_small_m_kernel": 0.35,
            "_nf4_lora_fwd_small_m_group_kernel": 0.35, "_nf4_lora_gemv_kernel": (0.70, 0.45),
            "_lora_u_kernel": 0.75, "_lora_bwd_du_db_kernel": 0.75, "_lora_bwd_da_kernel": 0.75,
            "_lora_bwd_du_db_group_kernel": 0.75}
# headline kernels compiled for sm_80 (of the two archs gated here) only: a group's dx GEMM
# runs on sm_80's family, not sm_90 (csrc_triton/backward.py GROUP_DX_TARGETS)
HEADLINE_SM80 = {"_nf4_lora_bwd_dx_group_kernel": 0.85}


def test_headline_configs_reach_their_modelled_ceilings(report):
    """Issue 10: the configs the GPU autotuner takes for Llama-3-8B's layers at M >= 4096 (the
    LARGE_M lists), bf16 and fp16, r 16 and 64, on sm_90 and sm_80, reach 0.85 of tensor-core
    peak in the hot-loop model (forward and dx); the dequantize kernel 0.80 of HBM bandwidth.
    The small-M kernel and its group form are gated at the floor they reach (0.35; issue 10
    asks 0.75, not met: csrc_triton/small_m.py HBM_FLOOR says why); the CUDA-core M <= 2
    kernel at 0.70 (M = 1) and 0.45 (M = 2) (csrc_triton/gemv.py HBM_FLOOR). Issue 11: U (r 16 to 64, with and without
    dropout), dU/dB and dA at r 16 and 64 (dU/dB on sm_80 at r 16 only: nothing reaches it at
    64 there), 0.75 of HBM bandwidth on the activation bytes they move. Every weight-decoding
    one decodes through the register table: SHFL in its main loop and no load of the code
    table through memory."""
    rows = [r for r in report if r["ceiling_target"]]
    covered = {(r["kernel"], r["arch"]) for r in rows}
    assert covered == {(k, a) for k in HEADLINE for a in ("sm_80", "sm_90")} \
        | {(k, "sm_80") for k in HEADLINE_SM80}, covered
    for kernel, floor in {**HEADLINE, **HEADLINE_SM80}.items():  # not lowered silently
        floors = set(floor) if isinstance(floor, tuple) else {floor}
        assert {r["ceiling_target"] for r in rows if r["kernel"] == kernel} == floors, kernel
    fwd_labels = {r["config"].split(" ", 3)[3] for r in rows
                  if r["kernel"] == "_nf4_lora_fwd_kernel"}
    assert fwd_labels == {f"{dt} k_aligned=1 r={r}" for dt in ("bf16", "fp16") for r in (16, 64)}
    # issue 28: with wgmma's operand reads counted, sm_90's fused GEMMs and its dU/dB at R_PAD
    # 64 sit below their targets; the floors in force (compilecheck.OPEN_FLOORS) hold them
    from fastlora.compilecheck import ceiling_gate

    below = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['ceiling']:.2f} < "
             f"{ceiling_gate(r)} (target {r['ceiling_target']})" for r in rows
             if r["ceiling"] < ceiling_gate(r)]
    assert not below, "\n".join(below)
    gathered = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['loop_shuffles']} SHFL, "
                f"{r['code_table_loads']} code loads" for r in rows if r["decodes_weight"]
                and (r["loop_shuffles"] == 0 or r["code_table_loads"])]
    assert not gathered, "\n".join(gathered)


def test_problems_flags_a_headline_below_its_ceiling_or_off_the_register_table():
    row = {"kernel": "k", "config": "c", "arch": "sm_90", "registers": 200, "stack_bytes": 0,
           "local_bytes": 0, "shared_bytes": 0, "mma_instructions": 4, "uses_dot": True,
           "ceiling_target": 0.85, "ceiling": 0.9, "loop_shuffles": 32, "code_table_loads": 0,
           "decodes_weight": True}
    assert problems([row]) == []
    assert "below its gate 0.85" in problems([{**row, "arch": "sm_80", "ceiling": 0.84}])[0]
    # sm_90 under an open floor (issue 28): 0.66 passes its 0.65 floor, 0.64 does not
    assert problems([{**row, "ceiling": 0.66}]) == []
    found = problems([{**row, "ceiling": 0.64}])
    assert "below its gate 0.65 (target 0.85, open)" in found[0], found
    assert "register-table" in problems([{**row, "loop_shuffles": 0}])[0]
    assert "register-table" in problems([{**row, "code_table_loads": 64}])[0]
    assert problems([{**row, "ceiling_target": 0.0, "ceiling": 0.1, "loop_shuffles": 0}]) == []
    # a kernel that reads no 4-bit weight (U, du_db, da) is gated on its ceiling alone
    assert problems([{**row, "decodes_weight": False, "loop_shuffles": 0}]) == []


def test_the_gather_decode_is_caught_when_compiled():
    """Compiling a headline config with LANE_TABLE off (the interpreter's decode: the table
    gathered through memory) fails the gate: the check sees what was compiled, not a flag."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import dataclasses, json\n"
        "from csrc_triton import forward\n"
        "from fastlora.compilecheck import compile_spec, problems\n"
        "spec = next(s for s in forward.COMPILE_SPECS if s.ceiling_target and 'sm_90' in s.archs)\n"
        "off = dataclasses.replace(spec, constexprs={**spec.constexprs, 'LANE_TABLE': False})\n"
        "rows = [compile_spec(spec, 'sm_90'), compile_spec(off, 'sm_90')]\n"
        "print(json.dumps([[r['loop_shuffles'], r['code_table_loads'], problems([r])] "
        "for r in rows]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    (on_shfl, on_loads, on_found), (off_shfl, off_loads, off_found) = json.loads(
        done.stdout.strip().splitlines()[-1])
    assert on_shfl > 0 and on_loads == 0 and on_found == []
    assert off_shfl == 0 and off_loads > 0
    assert any("register-table" in f for f in off_found), off_found


def _label(config: str) -> dict:
    """dtype, dropout, padded rank(s) of a U / dA row's config string."""
    import re

    words = config.split()
    out = {"dtype": words[3]}
    ranks = re.search(r"ranks=([\d+]+)", config)
    if ranks:
        out["ranks"] = [int(r) for r in ranks.group(1).split("+")]
    pad = re.search(r"(?:BLOCK_R|R_PAD)=(\d+)", config)
    if pad:
        out["r_pad"] = int(pad.group(1))
    drop = re.search(r"dropout=(\d)", config)
    out["dropout"] = drop.group(1) == "1" if drop else True  # the dA specs draw the mask
    return out


GROUP_OF = {"_lora_u_group_kernel": "_lora_u_kernel",
            "_lora_bwd_da_group_kernel": "_lora_bwd_da_kernel"}


def test_group_kernels_are_no_slower_than_their_members(report):
    """Issue 13: a group's U / dA kernel reads x once where its G members' kernels read it G
    times. In the hot-loop model its time (x's bytes over its ceiling) must not exceed the sum
    of its members' kernels' (G x the bytes over the headline single-layer ceiling at the
    member's padded rank, the next compiled one above when that rank has none) by more than
    5%: G x group ceiling >= 0.95 x member ceiling. 16-bit activations, sm_80 and sm_90, with
    dropout (each member draws its own mask: the group issues G masks' instructions per
    element, about what its members issue together) and, for U, without. No spill anywhere."""
    from csrc_triton.group import r_pad

    singles = {}
    for row in report:
        if row["kernel"] in GROUP_OF.values() and row["ceiling_target"] > 0:
            lab = _label(row["config"])
            key = (row["kernel"], row["arch"], lab["dtype"], lab["dropout"], lab["r_pad"])
            singles[key] = max(singles.get(key, 0.0), row["ceiling"])
    checked, failures = 0, []
    for row in report:
        if row["kernel"] not in GROUP_OF:
            continue
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
        lab = _label(row["config"])
        if lab["dtype"] not in ("bf16", "fp16"):
            continue
        single = GROUP_OF[row["kernel"]]
        pads = sorted(p for (k, a, d, dr, p) in singles
                      if (k, a, d, dr) == (single, row["arch"], lab["dtype"], lab["dropout"])
                      and p >= r_pad(max(lab["ranks"])))
        if not pads:
            continue
        member = singles[(single, row["arch"], lab["dtype"], lab["dropout"], pads[0])]
        checked += 1
        if len(lab["ranks"]) * row["ceiling"] < 0.95 * member:
            failures.append(f"{row['kernel']} {row['arch']} {row['config']}: "
                            f"{len(lab['ranks'])} x {row['ceiling']:.2f} < 0.95 x {member:.2f}")
    assert checked >= 24, checked
    assert not failures, "\n".join(failures)


@pytest.mark.quick
def test_one_headline_config_compiles_at_its_target():
    """The quick tier's compile: one headline config (the sm_90 forward's first), compiled
    here, not read from the record: no spill, tensor-core instructions, its ceiling gate."""
    from csrc_triton import all_compile_specs
    from fastlora.compilecheck import ceiling_gate, compile_report

    spec = next(s for s in all_compile_specs() if s.kernel == "_nf4_lora_fwd_kernel"
                and s.ceiling_target > 0 and "sm_90" in s.archs)
    rows = compile_report(("sm_90",), configs=[(spec.kernel, spec.config)])
    assert len(rows) == 1
    assert problems(rows) == [], problems(rows)
    assert rows[0]["mma_instructions"] > 0 and rows[0]["ceiling"] >= ceiling_gate(rows[0])


def test_headline_gemm_rows_carry_their_plain_gemm_calibration(report):
    """Issue 28: each headline fused GEMM row (forward, dx) has the ceiling of a plain bf16 GEMM
    of its output tile, warps and stages (csrc_triton/calibration.py) compiled in the same
    report, and its own ceiling's ratio to it."""
    from csrc_triton.calibration import FUSED_TILES, PLAIN_KERNEL

    plain = {(r["config"], r["arch"]): r for r in report if r["kernel"] == PLAIN_KERNEL}
    assert plain and all(r["mma_instructions"] > 0 and r["ceiling"] for r in plain.values())
    rows = [r for r in report if r["kernel"] in FUSED_TILES and r["ceiling_target"]]
    assert rows
    for r in rows:
        assert r["vs_plain"] == pytest.approx(r["ceiling"] / r["plain_ceiling"]), r["config"]
        assert r["plain_ceiling"] in {p["ceiling"] for (c, a), p in plain.items()
                                      if a == r["arch"]}
