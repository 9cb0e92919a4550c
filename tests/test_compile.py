"""Every shipped kernel config compiles ahead of time for sm_80 and sm_90 on this CPU machine
with zero spill bytes, and with tensor-core instructions wherever it calls tl.dot."""

import pytest

import fastlora
from fastlora.compilecheck import FIELDS, format_table, problems


@pytest.fixture(scope="module")
def report():
    return fastlora.compile_report(archs=("sm_80", "sm_90"))


def test_report_rows_have_the_documented_fields(report):
    assert report, "no kernel configs were compiled"
    for row in report:
        assert set(FIELDS) <= set(row)
        assert row["registers"] > 0


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
    assert len(found) == 2 and "spills" in found[0] and "HMMA/HGMMA" in found[1]


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
    only_wide = SYNTHETIC_TTIR.replace("%v = tt.load %ptrs :", "%v = tt.load %ptrs2 :")
    assert narrow_pointer_args(only_wide) == {"code_ptr"}


def test_every_large_tensor_is_addressed_with_64bit_offsets(report):
    """Issue 7 item 4 statically: x, y, dy, dx, U, dU, packed weight, absmax and workspaces
    reach their pointers through an int64 offset in every shipped kernel config (tests in
    tests/test_large_index.py show it at run time)."""
    bad = [r for r in report if r["i32_addressed"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['config']}] {r['arch']}: {r['i32_addressed']}"
                              for r in bad)
