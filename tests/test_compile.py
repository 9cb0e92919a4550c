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
