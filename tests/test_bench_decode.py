"""`fastlora bench --modes decode` (fastlora/bench/decode.py, issue 29 part 5): one decoder
layer's forward at M = 1, 4, 16. The model's launches and bytes against hand counts, each
provider's layer callable against the float64 reference on tiny shapes, and the no-GPU run's
table (modelled, with the host time measured here)."""

import pytest
import torch

from fastlora.bench import decode, model, shapes, suite
from fastlora.cases import reference_pair
from fastlora.numerics import assert_close

LLAMA = shapes.MODELS["llama3-8b"]
# Llama-3-8B's decoder layer, N x K: q 4096x4096, k and v 1024x4096, o 4096x4096, gate and
# up 14336x4096, down 4096x14336: 218,103,808 weights -> 109,051,904 packed bytes, one uint8
# absmax per 64 (3,407,872) and one fp32 per 256 of those (13,312 x 4 = 53,248)
FLOOR_BYTES = 109_051_904 + 3_407_872 + 53_248


def _opts(tmp_path=None, shapes_=LLAMA, ranks=(16,)):
    return suite.Options(shapes=list(shapes_), ms=(), ranks=ranks, modes=("decode",),
                         providers=[], out=str(tmp_path or "."), compile_report=False,
                         gpus=("H100 SXM",), say=lambda line: None)


@pytest.mark.quick
def test_decode_launches_and_floor_hand_counted():
    opts = _opts()
    (name, layers), = decode.decoder_layers(opts.shapes)
    assert name == "llama3-8b" and len(layers) == 7
    assert decode.floor_bytes(opts, layers) == FLOOR_BYTES

    def launches(provider, m):
        return len(decode.layer_steps(provider, opts, m, layers, 16))
    # fastlora: one launch a projection at M <= 2 (U and y together), U + split-K GEMM above
    assert [launches("fastlora", m) for m in (1, 2, 4, 16)] == [7, 7, 14, 14]
    # grouped: at M <= 2 the members' own launch; above, q/k/v and gate/up two launches a group
    # and o, down their own two: 8 (issue 29's limit for a decoder layer)
    assert [launches("fastlora_grouped", m) for m in (1, 4, 16)] == [7, 8, 8]
    # PEFT at generation: bnb's fused product, PEFT's clone, lora_A, lora_B, * s, + : 6 each
    assert launches("peft_bnb", 1) == 42
    assert launches("dequant_mm", 4) == 28
    with pytest.raises(ValueError, match="1 <= M"):
        decode.layer_steps("fastlora", opts, 17, layers, 16)
    with pytest.raises(ValueError, match="provider"):
        decode.layer_steps("unsloth", opts, 1, layers, 16)


@pytest.mark.quick
def test_decode_group_reads_x_once():
    """The grouped layer's bytes are the per-layer ones less the re-reads of x: q/k/v read x
    in 1 U launch and 1 GEMM instead of 3 each (4 fewer), gate/up in 1 + 1 instead of 2 + 2
    (2 fewer); FLOPs equal."""
    opts = _opts()
    (_, layers), = decode.decoder_layers(opts.shapes)
    m = 4
    per_layer = decode.layer_steps("fastlora", opts, m, layers, 16)
    grouped = decode.layer_steps("fastlora_grouped", opts, m, layers, 16)
    x_bytes = m * 4096 * 2
    assert sum(s.bytes for s in per_layer) - sum(s.bytes for s in grouped) == 6 * x_bytes
    assert sum(s.flops for s in per_layer) == sum(s.flops for s in grouped)
    with pytest.raises(ValueError, match="3 <= M"):
        model.group_forward_steps([opts.dims(1, layers["q_proj"], 16)] * 2)


@pytest.mark.quick
def test_decode_modelled_rows():
    """At M = 1 grouped and per-layer fastlora are modelled alike (the same launches), the
    floor is the weight bytes over H100's bandwidth, and `x floor` / `PEFT / this` follow
    from the times; host time only on M = 1 rows of the providers measured."""
    opts = _opts()
    rows = decode.modelled_rows(opts, {}, {"fastlora": 100.0, "peft_bnb": 150.0})
    assert len(rows) == len(decode.DECODE_MS) * len(decode.MODELLED)
    by = {(r["m"], r["provider"]): r for r in rows}
    gbs = suite.peak_named("H100 SXM").gbs
    for row in rows:
        assert row["floor_us"] == pytest.approx(1e6 * FLOOR_BYTES / (gbs * 1e9))
        assert row["x_floor"] == pytest.approx(row["modelled_us"] / row["floor_us"])
        assert row["vs_peft"] == pytest.approx(by[(row["m"], "peft_bnb")]["modelled_us"]
                                               / row["modelled_us"])
        assert row["launch_us"] == pytest.approx(row["launches"] * 4.0)
    assert by[(1, "fastlora")]["modelled_us"] == by[(1, "fastlora_grouped")]["modelled_us"]
    assert by[(4, "fastlora_grouped")]["modelled_us"] < by[(4, "fastlora")]["modelled_us"]
    assert by[(1, "fastlora")]["host_us"] == 100.0 and by[(1, "peft_bnb")]["host_us"] == 150.0
    assert by[(4, "fastlora")]["host_us"] != by[(4, "fastlora")]["host_us"]  # NaN: not measured


# a decoder layer small enough for the interpreter: hidden 64, intermediate 128, kv 32
TINY = {"q_proj": shapes.LayerShape("tiny.q_proj", 64, 64, True),
        "k_proj": shapes.LayerShape("tiny.k_proj", 32, 64),
        "v_proj": shapes.LayerShape("tiny.v_proj", 32, 64),
        "o_proj": shapes.LayerShape("tiny.o_proj", 64, 64),
        "gate_proj": shapes.LayerShape("tiny.gate_proj", 128, 64),
        "up_proj": shapes.LayerShape("tiny.up_proj", 128, 64),
        "down_proj": shapes.LayerShape("tiny.down_proj", 64, 128)}


@pytest.mark.parametrize("m", [1, 4])
def test_decode_layer_callables_match_the_reference(m):
    """What the GPU run times: each provider's forward of the whole (tiny) decoder layer, every
    projection's output within the float64 bound of plain PyTorch (fastlora.numerics)."""
    from fastlora.bench import block

    opts = _opts(shapes_=TINY.values(), ranks=(8,))
    block_cases = [block.member_cases(opts, m, [TINY[n] for n in names], 8)
                   for _, names in decode.BLOCKS]
    cases = [c for group in block_cases for c in group]
    expected = [reference_pair(c, opts.torch_dtype) for c in cases]
    for provider in ("fastlora", "fastlora_grouped", "peft_bnb", "dequant_mm"):
        with torch.no_grad():
            outs = decode._layer_callable(provider, block_cases)()
        flat = [y for out in outs for y in (out if isinstance(out, list) else [out])]
        assert len(flat) == 7, provider
        for i, (y, (truth, baseline)) in enumerate(zip(flat, expected)):
            assert_close(f"{provider} projection {i}", y, truth["y"], baseline["y"])


def test_decode_mode_without_a_gpu_writes_the_modelled_table(tmp_path, monkeypatch):
    """`fastlora bench --modes decode` on the CPU: the modelled table (labelled so) with the
    host time of a decoder layer's calls measured here, and no timing of the GPU work."""
    from fastlora.bench import hosttime

    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU run")
    monkeypatch.setattr(hosttime, "ROUNDS", 3)
    opts = _opts(tmp_path)
    assert suite.run(opts) == 0
    table = (tmp_path / "decode_modelled.md").read_text()
    assert "(modelled)" in table and "MODELLED, not measured" in table
    rows = (tmp_path / "decode_modelled.csv").read_text().splitlines()
    assert len(rows) == 1 + len(decode.DECODE_MS) * len(decode.MODELLED)
    m1 = [line for line in rows[1:] if ",1,16,fastlora," in line]
    assert m1 and "nan" not in m1[0].split(",")[-1], m1
    assert not (tmp_path / "decode.csv").exists()
