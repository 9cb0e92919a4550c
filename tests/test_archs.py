"""The GPUs beyond A100 that run its config lists (issue 31; fastlora.gpus.CONFIG_FAMILY): the
mma.sync RTX 3090 / A10 (sm_86), RTX 4090 / L40S (sm_89) and RTX 5090 / RTX PRO 6000 (sm_120)
with 99 KB of shared memory a block, and B200 (sm_100: tcgen05, 227 KB), except where a config
spills or overflows there: each kernel file's SIBLING_FIXES replace or drop it for that arch
(csrc_triton/common.py). Every
config they run is compiled for them (the committed compile record, a rotating slice recompiled
and compared) with no spill, tensor-core instructions wherever tl.dot is called, shared memory
within the arch's limit and, for the headline configs, its modelled ceiling at or above its
target; and what a launch there picks is what was compiled."""

import pytest
import triton

from csrc_triton import backward, forward, group, small_m
from csrc_triton.common import (SM80_SIBLINGS, CompileSpec, SiblingFix, sibling_config,
                                sibling_configs, sibling_specs)
from fastlora.compilecheck import ARCHS as COMPILED, format_table, problems, report_jobs
from fastlora.compilerecord import load_record, recorded_report, spec_key
from fastlora.gpus import CONFIG_FAMILY

ARCHS = ("sm_86", "sm_89", "sm_100", "sm_120")
RECHECK_SLICES = 64  # each run recompiles ~1/64 of these ~1,200 recorded rows


@pytest.fixture(scope="module")
def report(rotation):
    rows = recorded_report(archs=ARCHS, recheck=(rotation % RECHECK_SLICES, RECHECK_SLICES))
    compiled = sum(r["source"] == "compiled" for r in rows)
    print(f"compile report {', '.join(ARCHS)}: {len(rows)} rows, {compiled} compiled")
    return rows


@pytest.mark.quick
def test_the_siblings_are_the_compiled_mma_sync_archs():
    assert SM80_SIBLINGS == ARCHS
    assert {a for a in COMPILED if CONFIG_FAMILY[a] == "sm_80" and a != "sm_80"} == set(ARCHS)


@pytest.mark.quick
def test_sibling_fixes_replace_or_drop_only_where_they_match():
    """Hand-made fixes on a hand-made list: sm_80 and sm_90 run the list as it is; a sibling
    a fix names gets the replacement (dicts and triton.Config alike) or loses the entry; the
    activation class, the precision and the rank limit narrow a fix."""
    a = {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    b = {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    fixes = (SiblingFix("k", ("sm_86",), {"BLOCK_M": 64}, {"num_stages": 1}, fp32=False),
             SiblingFix("k", ("sm_120",), {"BLOCK_K": 64}, None, max_rank=32))
    for arch in ("sm_80", "sm_90", "sm_89"):
        assert sibling_configs(fixes, "k", arch, [a, b], False) == [a, b]
    assert sibling_configs(fixes, "k", "sm_86", [a, b], False) == [{**a, "num_stages": 1}, b]
    assert sibling_configs(fixes, "k", "sm_86", [a, b], True) == [a, b]  # fp32: not named
    assert sibling_configs(fixes, "other", "sm_86", [a, b], False) == [a, b]
    assert sibling_configs(fixes, "k", "sm_120", [a, b], False, rank=32) == [a]
    assert sibling_configs(fixes, "k", "sm_120", [a, b], False, rank=48) == [a, b]
    config = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    config.large_m = True
    got = sibling_configs(fixes, "k", "sm_86", [config], False)[0]
    assert (got.kwargs, got.num_warps, got.num_stages, got.large_m) == (
        {"BLOCK_M": 64, "BLOCK_K": 32}, 4, 1, True)
    assert config.num_stages == 3  # the shipped config itself is untouched
    # a kernel launched with one fixed config: a fix replaces it; one that drops it is an error
    assert sibling_config(fixes, "k", "sm_86", a, False) == {**a, "num_stages": 1}
    assert sibling_config(fixes, "k", "sm_120", b, False, rank=48) == b
    with pytest.raises(ValueError, match="drops k's only config on sm_120"):
        sibling_config(fixes, "k", "sm_120", b, False, rank=32)


@pytest.mark.quick
def test_a_sibling_fix_rescales_the_trip_work_by_its_blocks():
    """A replacement spec's trip work is its own tile's, not the replaced one's: scaled by the
    changed block sizes it is the product of (trip_blocks), unchanged by the others."""
    gemm = CompileSpec(kernel="k", fn=None, signature={}, num_warps=8, num_stages=3,
                       constexprs={"BLOCK_M": 256, "BLOCK_N": 16, "BLOCK_K": 128, "G": 8},
                       trip_flops=2 * 256 * 16 * 128,
                       trip_blocks=("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    memory = CompileSpec(kernel="u", fn=None, signature={}, num_warps=4, num_stages=2,
                         constexprs={"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 64},
                         trip_bytes=64 * 64 * 2, trip_blocks=("BLOCK_M", "BLOCK_K"))
    fixes = (SiblingFix("k", ("sm_100",), {"BLOCK_N": 16}, {"BLOCK_N": 64, "num_stages": 2}),
             SiblingFix("u", ("sm_120",), {"BLOCK_K": 64}, {"BLOCK_K": 32, "BLOCK_R": 32}),
             SiblingFix("u", ("sm_86",), {"BLOCK_K": 64}, {"num_warps": 8}))
    out = {(s.kernel, s.archs): s for s in sibling_specs(fixes, [gemm, memory])}
    assert out["k", ("sm_100",)].trip_flops == 2 * 256 * 64 * 128
    assert out["k", ("sm_100",)].num_stages == 2
    assert out["u", ("sm_120",)].trip_bytes == 64 * 32 * 2  # BLOCK_R is not in its trip
    assert out["u", ("sm_86",)].trip_bytes == 64 * 64 * 2
    assert out["k", ("sm_80", "sm_90")].trip_flops == gemm.trip_flops
    assert out["k", ("sm_80", "sm_90")].not_for == ("sm_100",)


def _compiled(arch):
    return [spec for spec, _ in report_jobs((arch,))]


def _has(specs, kernel, config):
    """Whether a spec of `kernel` has the config's block sizes, warps and stages."""
    if isinstance(config, dict):
        blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
        warps, stages = config["num_warps"], config["num_stages"]
    else:
        blocks, warps, stages = config.kwargs, config.num_warps, config.num_stages
    return any(s.kernel == kernel and s.num_warps == warps and s.num_stages == stages
               and all(s.constexprs.get(k) == v for k, v in blocks.items()) for s in specs)


@pytest.mark.parametrize("arch", ("sm_80",) + ARCHS)
def test_a_launch_there_runs_what_was_compiled_there(arch):
    """The configs the launchers take on `arch` (the U kernel's and the groups' fixed ones,
    the small-M, dx, dU/dB and dA autotune lists) are each compiled for it."""
    specs = _compiled(arch)
    missing = []
    for fp32, precision in ((False, "tf32"), (True, "tf32"), (True, "ieee")):
        for r in (16, 32, 64, 128, 256):
            cfg = forward.u_config(r, precision, fp32, arch)
            if not _has(specs, "_lora_u_kernel", cfg):
                missing.append(f"U r={r} fp32={fp32} {precision}: {cfg}")
        for cfg in small_m.small_m_configs(fp32, True, precision, arch):
            if not _has(specs, "_nf4_lora_fwd_small_m_kernel", cfg):
                missing.append(f"small-M fp32={fp32} {precision}: {cfg}")
        for ranks in group.HEADLINE_GROUPS:
            if precision == "ieee" and group.total_r_pad(ranks) > group.MAX_TOTAL_R_PAD_IEEE:
                continue
            for kernel, cfg in (("_lora_u_group_kernel", group.u_config(ranks, precision,
                                                                        fp32, arch)),
                                ("_lora_bwd_da_group_kernel", group.da_config(
                                    ranks, fp32, precision, arch))):
                if not _has(specs, kernel, cfg):
                    missing.append(f"{kernel} {ranks} fp32={fp32} {precision}: {cfg}")
        for name, fn in backward.KERNELS.items():
            if name == "dx_group" and (arch not in backward.GROUP_DX_TARGETS
                                       or precision == "ieee"):
                continue  # launch/group._dx_group launches it only there
            if name == "du_db_group" and fp32:
                continue  # launch/group._du_db_group runs each member's du_db there
            for cfg in backward.config_list(name, CONFIG_FAMILY[arch], fp32, precision, arch):
                if not _has(specs, fn.__name__, cfg):
                    missing.append(f"{name} fp32={fp32} {precision}: {cfg}")
    assert not missing, "\n".join(missing)


def test_every_sm80_config_is_compiled_for_its_siblings():
    """Each sm_80 spec is compiled for each sibling, or that sibling's fix replaces or drops
    it (CompileSpec.not_for); nothing for sm_90 alone is."""
    sm80 = _compiled("sm_80")
    for arch in ARCHS:
        specs = _compiled(arch)
        assert [s for s in sm80 if arch not in s.not_for] == \
            [s for s in specs if "sm_80" in s.archs], arch
        assert not any(s.archs == ("sm_90",) for s in specs)
        assert len(specs) >= 0.9 * len(sm80)


def test_the_record_holds_them():
    """The committed record holds every config of these archs on the pinned toolchain (a kernel
    change without `fastlora compile-report --archs all --write-record` fails here)."""
    from fastlora.support import CHECKED_TRITONS

    if triton.__version__ != CHECKED_TRITONS[-1]:
        pytest.skip(f"the record is kept for the pinned Triton {CHECKED_TRITONS[-1]}")
    recorded = load_record()
    missing = [f"{spec.kernel} [{spec.config}] {arch}" for spec, arch in report_jobs(ARCHS)
               if spec_key(spec, arch) not in recorded]
    assert not missing, f"{len(missing)} configs not in the record:\n" + "\n".join(missing[:20])


def test_recompiled_rows_agree_with_the_record(report):
    bad = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['record_mismatch']}"
           for r in report if r.get("record_mismatch")]
    assert not bad, "rows differ from the compile record:\n" + "\n".join(bad)


def test_no_spill_no_missing_mma_and_shared_memory_fits(report):
    found = problems(report)
    assert not found, "\n".join(found) + "\n\n" + format_table(report)
