"""The GPU table (fastlora/gpus.py): each row against its datasheet's figures, written here as
literals (not computed by the code under test), the device-name lookup, the compile check's
per-clock figures, and `fastlora bench --gpu`."""

import pytest

from fastlora import cli, compilecheck, gpus
from fastlora.bench import model, peaks

# name: (dense BF16 TFLOP/s with FP32 accumulate, DRAM GB/s) as the sources in gpus.py give
# them (half the "with sparsity" figure where only that is quoted)
DATASHEET = {
    "A100 SXM 80GB": (312, 2039), "A100 PCIe 80GB": (312, 1935), "A100 40GB": (312, 1555),
    "H100 SXM": (989.4, 3350), "H100 PCIe": (756.5, 2000), "H100 NVL": (835.5, 3900),
    "H200 SXM": (989.4, 4800), "H200 NVL": (835.5, 4800),
    "A10": (125, 600), "RTX 3090": (71, 936),
    "L4": (121, 300), "L40S": (366.5, 864), "RTX 4090": (165.2, 1008),
    "B200": (2250, 8000), "RTX 5090": (209.5, 1792), "RTX PRO 6000": (503.8, 1792),
}
# a GeForce part and the datacenter / workstation part of the same die
SIBLINGS = [("RTX 3090", "A10"), ("RTX 4090", "L40S"), ("RTX 5090", "RTX PRO 6000")]


@pytest.mark.quick
def test_every_row_reproduces_its_datasheet():
    assert set(DATASHEET) == {gpu.name for gpu in gpus.GPUS}
    for gpu in gpus.GPUS:
        tflops, gbs = DATASHEET[gpu.name]
        assert gpu.tflops == pytest.approx(tflops, rel=0.01), gpu.name
        assert gpu.dram_gbs == gbs, gpu.name


@pytest.mark.quick
def test_geforce_runs_fp32_accumulation_at_half_rate():
    for geforce, datacenter in SIBLINGS:
        ours, theirs = gpus.gpu_named(geforce), gpus.gpu_named(datacenter)
        assert ours.arch == theirs.arch
        assert 2 * ours.mma_flops_per_clock_sm == theirs.mma_flops_per_clock_sm


def test_rows_are_consistent_per_arch():
    """Shared memory and registers are compute-capability facts (CUDA programming guide);
    the per-clock tensor rate doubles from sm_80 to sm_90 to sm_100."""
    smem = {"sm_80": (163, 164), "sm_86": (99, 100), "sm_89": (99, 100), "sm_90": (227, 228),
            "sm_100": (227, 228), "sm_120": (99, 100)}
    for gpu in gpus.GPUS:
        assert (gpu.smem_per_block_kib, gpu.smem_per_sm_kib) == smem[gpu.arch], gpu.name
        assert gpu.registers_per_sm == 65536
    rate = {arch: gpus.reference(arch).mma_flops_per_clock_sm for arch in gpus.REFERENCE_GPU}
    assert rate["sm_80"] == 2048 and rate["sm_90"] == 4096 and rate["sm_100"] == 8192
    # the table's H100 SXM: 989.4 TF = 132 SMs x 4096 x 1.83 GHz (below the 1.98 GHz boost)
    h100 = gpus.gpu_named("H100 SXM")
    assert (h100.sms, h100.boost_clock_ghz) == (132, 1.83)
    assert h100.hbm_bytes_per_clock_sm == pytest.approx(3350e9 / 132 / 1.83e9)


@pytest.mark.quick
def test_compile_check_per_clock_figures_are_unchanged():
    """The committed compile record's ceilings were computed from these exact numbers."""
    assert compilecheck.DENSE_MMA_FLOPS == {"sm_80": 2048, "sm_86": 1024, "sm_89": 1024,
                                            "sm_90": 4096, "sm_100": 8192, "sm_120": 1024}
    # bandwidth to 10 GB/s: A10 600, L40S 864 -> 860, RTX PRO 6000 1,792 -> 1,790; B200 8,000
    # at 148 SMs and 1.856 GHz
    assert compilecheck.HBM_BYTES_PER_CLOCK == {"sm_80": 2.04e12 / 108 / 1.41e9,
                                                "sm_86": 0.60e12 / 72 / 1.695e9,
                                                "sm_89": 0.86e12 / 142 / 2.52e9,
                                                "sm_90": 3.35e12 / 132 / 1.83e9,
                                                "sm_100": 8.0e12 / 148 / 1.856e9,
                                                "sm_120": 1.79e12 / 188 / 2.617e9}
    assert gpus.REFERENCE_GPU["sm_80"] == "A100 SXM 80GB"
    assert gpus.REFERENCE_GPU["sm_90"] == "H100 SXM"
    assert set(compilecheck.ARCHS) <= set(gpus.REFERENCE_GPU)


@pytest.mark.quick
def test_capability_to_compile_target_and_shared_memory():
    """A device's compute capability picks its compile target, its config family (sm_90's
    wgmma lists or sm_80's mma.sync ones) and its shared memory a block (CUDA programming
    guide: 163 KB on 8.0, 99 KB on 8.6 / 8.9 / 12.0, 227 KB on 9.0 / 10.0)."""
    cases = {(8, 0): ("sm_80", "sm_80", 163), (8, 6): ("sm_86", "sm_80", 99),
             (8, 7): ("sm_86", "sm_80", 99), (8, 9): ("sm_89", "sm_80", 99),
             (9, 0): ("sm_90", "sm_90", 227), (10, 0): ("sm_100", "sm_80", 227),
             (10, 3): ("sm_100", "sm_80", 227), (12, 0): ("sm_120", "sm_80", 99),
             (12, 1): ("sm_120", "sm_80", 99)}
    for capability, (arch, family, kib) in cases.items():
        assert gpus.capability_arch(*capability) == arch, capability
        assert gpus.CONFIG_FAMILY[arch] == family
        assert gpus.smem_per_block_bytes(arch) == kib * 1024
    with pytest.raises(ValueError, match="8.0"):
        gpus.capability_arch(7, 5)


@pytest.mark.quick
def test_launches_on_a_gpu_older_than_sm80_take_sm80_configs(monkeypatch):
    """A T4 (7.5) has no compile target; its launches take sm_80's configs, as before."""
    import torch

    from fastlora.launch import common

    for capability, want in (((7, 5), "sm_80"), ((8, 6), "sm_86"), ((9, 0), "sm_90")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        assert common.compile_arch(torch.device("cuda", 0)) == want
        assert common.arch(torch.device("cuda", 0)) == gpus.CONFIG_FAMILY[want]
    with pytest.raises(KeyError, match="sm_75"):
        gpus.smem_per_block_bytes("sm_75")


@pytest.mark.quick
def test_a_gpu_older_than_sm80_runs_the_reference(monkeypatch, caplog):
    """Issue 31: on a T4 (7.5) or V100 (7.0) the kernels are neither compiled nor checked, so
    FASTLORA_BACKEND=auto runs the reference path there and says why once (per device model),
    and FASTLORA_BACKEND=triton refuses with the reason; an sm_80+ GPU runs the kernels.
    (A fake CUDA tensor: only is_cuda and device are read.)"""
    import logging
    import re
    from types import SimpleNamespace

    import torch

    from fastlora import backend

    monkeypatch.setattr(backend, "_unserved_logged", set())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for capability, served in (((7, 5), False), ((7, 0), False), ((8, 0), True),
                               ((8, 9), True), ((12, 0), True)):
        backend._gpu_problem.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
        monkeypatch.setenv("FASTLORA_BACKEND", "auto")
        with caplog.at_level(logging.WARNING, logger="fastlora"):
            caplog.clear()
            assert backend.use_triton(on_gpu) is served, capability
            assert backend.use_triton(on_gpu) is served, capability
        warned = [r.getMessage() for r in caplog.records]
        monkeypatch.setenv("FASTLORA_BACKEND", "triton")
        if served:
            assert warned == [] and backend.use_triton(on_gpu) is True
            assert "triton (compiled kernels)" in backend.describe("cuda:0")
            continue
        version = rf"compute capability {capability[0]}\.{capability[1]}"
        assert len(warned) == 1, warned  # two calls, one warning
        assert re.search(version, warned[0]) and "reference path" in warned[0], warned
        with pytest.raises(RuntimeError, match=version):
            backend.use_triton(on_gpu)
        assert "reference (PyTorch): Tesla T4 is compute capability" in backend.describe("cuda:0")
    backend._gpu_problem.cache_clear()


@pytest.mark.quick
@pytest.mark.parametrize("device, name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
    ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA B200", "B200"), ("NVIDIA GeForce RTX 5090", "RTX 5090"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000"),
    # not in the table: no row rather than a neighbour's
    ("NVIDIA A10G", None), ("NVIDIA L40", None), ("NVIDIA GB200", None),
    ("NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", None),
    ("NVIDIA RTX 6000 Ada Generation", None), ("Some Future GPU", None),
])
def test_device_name_lookup(device, name):
    found = gpus.gpu_for_device(device)
    assert (found.name if found else None) == name
    peak = peaks.peak_for(device)
    assert (peak.name if peak else None) == name


@pytest.mark.quick
def test_lookups_by_name_and_arch():
    assert gpus.gpu_named("h100 sxm") is gpus.gpu_named("H100 SXM")
    with pytest.raises(KeyError, match="known GPUs: A100 SXM 80GB, .*RTX PRO 6000"):
        gpus.gpu_named("H300")
    assert gpus.reference("sm_89").name == "L40S"
    with pytest.raises(KeyError, match="no reference GPU"):
        gpus.reference("sm_75")
    # the bench's view of the table: same figures, one place
    h100 = peaks.peak_named("H100 SXM")
    assert (h100.tflops, h100.gbs) == (gpus.gpu_named("H100 SXM").tflops, 3350)
    assert model.GPU_ARCHS == {gpu.name: gpu.arch for gpu in gpus.GPUS}


def test_current_gpu_and_the_modelled_pick(monkeypatch):
    """Without a GPU the model stands for the arch's reference GPU; on one it knows, that
    GPU's row. expected_pick without a peak models that GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus.current("sm_80").name == "A100 SXM 80GB"
    d = model.Dims(8192, 4096, 4096, 16)
    low = {model.FWD_KERNEL: 0.5, model.DX_KERNEL: 0.95}
    assert model.expected_pick("full", d, None, low, arch="sm_90") == \
        model.expected_pick("full", d, peaks.peak_named("H100 SXM"), low)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4090")
    assert gpus.current("sm_90").name == "RTX 4090"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert gpus.current("sm_90").name == "H100 SXM"


@pytest.mark.quick
def test_bench_gpu_option_parsing():
    args = cli._parser().parse_args(["bench", "--gpu", "rtx 4090,H100 SXM", "--gpu", "B200",
                                     "--gpu", "H100 SXM"])
    assert cli._gpu_names(args.gpu) == ("RTX 4090", "H100 SXM", "B200")
    assert cli._gpu_names(cli._parser().parse_args(["bench"]).gpu) == peaks.MODELLED_GPUS
    with pytest.raises(ValueError, match="no GPU given"):
        cli._gpu_names([" , "])


@pytest.mark.quick
def test_bench_unknown_gpu_is_one_line(tmp_path, capsys):
    code = cli.main(["bench", "--gpu", "H300", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fastlora bench: error: unknown GPU 'H300'; known GPUs: ")
    assert "RTX 4090" in lines[0] and "H100 SXM" in lines[0]


def test_modelled_tables_for_chosen_gpus(tmp_path, monkeypatch):
    """--gpu's GPUs in the modelled table: an arch the compile check does not cover (every
    arch of the table is covered: sm_100 taken out of it here) runs its kernels unmodelled and
    the note says why; file names stay apart."""
    from fastlora import compilecheck
    from fastlora.bench import shapes, suite

    monkeypatch.setattr(compilecheck, "ARCHS", {a: cc for a, cc in compilecheck.ARCHS.items()
                                                if a != "sm_100"})

    opts = suite.Options(shapes=[shapes.SHAPES["llama3-8b.q_proj"]], ms=(1, 4096), ranks=(16,),
                         modes=("forward",), providers=["fastlora", "peft_bnb"],
                         out=str(tmp_path), gpus=("B200", "H100 SXM", "H100 PCIe"),
                         say=lambda line: None)
    rows = suite.modelled_rows(opts, ceilings={})
    assert [r["gpu"] for r in rows[::4]] == ["B200", "H100 SXM", "H100 PCIe"]
    suite.run_modelled(opts, [])
    text = (tmp_path / "modelled.md").read_text()
    assert "B200 (sm_100, 16bit): none compiled" in text
    assert "(the compile check covers sm_80, sm_86, sm_89, sm_90, sm_120, not sm_100)" in text
    for slug in ("b200", "h100_sxm", "h100_pcie"):
        assert (tmp_path / f"modelled_speedup_{slug}_forward_r16.png").stat().st_size > 0
