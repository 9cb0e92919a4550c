"""Prepared calls at generation sizes (issue 29, host time): without autograd, at M <= 16 rows,
a fused layer's call runs through fastlora.prepare_lora_linear_4bit, built once per layer and
(device, dtype, input shape) and kept while its arguments stay unchanged.

Checked here: the result equals the general path's bit for bit (the same two launches on the
same arguments); the arguments are checked once, not at every call; every change the general
path would see (a weight written in place or replaced, scaling, bias, FASTLORA_BACKEND, the
dispatcher's setting) reaches the next call; autograd, active dropout, M > 16 and autocast take
the general path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora import modules, reference
from fastlora.numerics import assert_close
from fastlora.ops import linear as linear_op
from helpers import counting

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU-only: counts interpreter launches")

K, N, RANK = 128, 48, 8


def _layer(dtype=torch.bfloat16, bias=True, dropout=0.0, quant_type="nf4") -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(K, N, bias=bias)
    layer = fastlora.LoRALinear4bit.from_linear(linear, r=RANK, lora_alpha=16,
                                                lora_dropout=dropout, quant_type=quant_type,
                                                compute_dtype=dtype)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    return layer


def _general(layer, x):
    """The layer's output through the general path (the custom op): autograd on."""
    with torch.enable_grad():
        return layer(x).detach()


def _prepared_entries(layer) -> list:
    return [call for _, call in modules._PREPARED.get(layer.lora_A, {}).values()]


@pytest.mark.quick
@pytest.mark.parametrize("dtype,shape,bias,quant_type", [
    (torch.bfloat16, (1, 1, K), True, "nf4"), (torch.float16, (5, K), False, "fp4"),
    (torch.float32, (2, 8, K), True, "nf4"), (torch.bfloat16, (16, K), False, "nf4")],
    ids=["bf16-m1", "fp16-m5-fp4", "fp32-m16", "bf16-m16"])
def test_prepared_call_equals_the_general_path(dtype, shape, bias, quant_type):
    layer = _layer(dtype, bias, quant_type=quant_type)
    x = torch.randn(*shape, dtype=torch.float32)  # cast to the compute dtype in both paths
    want = _general(layer, x)
    with torch.no_grad(), counting(execute=True) as launches:
        got = [layer(x) for _ in range(3)]
    calls = _prepared_entries(layer)
    assert len(calls) == 1 and calls[0] is not None, "the prepared path did not serve"
    m = x.numel() // K
    # M <= 2: U and y in one launch (csrc_triton/gemv.py); else U, then the split-K GEMM
    assert launches == ({"_nf4_lora_gemv_kernel": 3} if m <= 2 else
                        {"_lora_u_kernel": 3, "_nf4_lora_fwd_small_m_kernel": 3}), launches
    for y in got:
        assert y.dtype == x.dtype and y.shape == want.shape
        assert torch.equal(y, want)


def test_arguments_are_checked_once(monkeypatch):
    layer = _layer()
    x = torch.randn(1, K)
    checks = []
    real = linear_op.check_inputs
    monkeypatch.setattr(linear_op, "check_inputs", lambda *a, **kw: checks.append(1) or
                        real(*a, **kw))
    with torch.no_grad():
        for _ in range(5):
            layer(x)
    assert len(checks) == 1


def test_changes_reach_the_next_call(monkeypatch):
    """Each change is made under no_grad between two prepared calls; the second call must equal
    the general path's output after the change (and differ from before where it should)."""
    layer = _layer(bias=True)
    x = torch.randn(3, K)

    def check(changed: bool = True):
        with torch.no_grad():
            before = layer(x)
        yield
        with torch.no_grad():
            after = layer(x)
        assert torch.equal(after, _general(layer, x))
        assert changed == (not torch.equal(after, before))

    def step(change, changed=True):
        steps = check(changed)
        next(steps)
        change()
        next(steps, None)

    with torch.no_grad():
        step(lambda: layer.lora_B.weight.mul_(2.0))                              # in place
        step(lambda: setattr(layer.lora_A.weight, "data", torch.randn(RANK, K)))  # new storage
        step(lambda: setattr(layer.lora_B, "weight", nn.Parameter(               # replaced
            torch.randn(N, RANK) * 0.1)))
        step(lambda: setattr(layer, "scaling", layer.scaling * 0.5))
        step(lambda: layer.base_layer.bias.add_(1.0))
        step(lambda: None, changed=False)
    # the backend read at every call: the reference path runs, with no launch
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    with torch.no_grad(), counting(execute=True) as launches:
        y = layer(x)
    assert not launches
    state = modules.bnb_quant_state(layer.base_layer)
    want = reference.lora_linear_4bit(
        x.to(torch.bfloat16), layer.base_layer.weight.data, state,
        layer.lora_A.weight.to(torch.bfloat16), layer.lora_B.weight.to(torch.bfloat16),
        layer.scaling, layer.base_layer.bias.to(torch.bfloat16)).float()
    assert torch.equal(y, want)
    # the dispatcher's setting: dequantize + matmul (fastlora's dequantize kernel launches)
    monkeypatch.setenv("FASTLORA_BACKEND", "auto")
    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    with torch.no_grad(), counting(execute=True) as launches:
        layer(x)
    assert "_nf4_lora_fwd_small_m_kernel" not in launches and launches, launches


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit", "torch AdamW"])
def test_an_optimizer_step_reaches_the_next_call(optimizer):
    """Generation between training steps (TRL's GRPO, online DPO): a prepared call holds the
    fp32 adapter cast to bf16; after a training step its output must be the new adapter's.
    bitsandbytes' 8-bit optimizers write the parameters without bumping their version
    counters, so only the optimizer-step hook can see the change."""
    import bitsandbytes as bnb

    layer = _layer(bias=False)
    params = [layer.lora_A.weight, layer.lora_B.weight]
    opt = (torch.optim.AdamW(params, lr=0.05) if optimizer == "torch AdamW"
           else getattr(bnb.optim, optimizer)(params, lr=0.05, min_8bit_size=1))
    x = torch.randn(2, K)
    with torch.no_grad():
        before = layer(x)  # prepared
    versions = [p._version for p in params]
    layer(torch.randn(8, K)).square().sum().backward()
    opt.step()
    if optimizer != "torch AdamW":  # the write the version counter misses
        assert [p._version for p in params] == versions
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _general(layer, x))


@pytest.mark.parametrize("case", ["grad", "dropout", "m17", "autocast"])
def test_other_calls_take_the_general_path(case):
    layer = _layer(dropout=0.2 if case == "dropout" else 0.0)
    x = torch.randn(17 if case == "m17" else 2, K)
    if case == "grad":
        layer(x)
    elif case == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    else:
        with torch.no_grad():
            layer(x)  # dropout: the layer is in training mode
    assert not _prepared_entries(layer)
    if case == "dropout":
        layer.eval()  # dropout off: the prepared path serves
        with torch.no_grad():
            layer(x)
        assert _prepared_entries(layer)


def test_prepare_returns_none_where_the_general_path_decides():
    layer = _layer()
    state = modules.bnb_quant_state(layer.base_layer)
    a = layer.lora_A.weight.to(torch.bfloat16)
    b = layer.lora_B.weight.to(torch.bfloat16)
    packed = layer.base_layer.weight.data
    for m in (0, 17):
        x = torch.randn(m, K, dtype=torch.bfloat16)
        assert fastlora.prepare_lora_linear_4bit(x, packed, state, a, b, 2.0) is None
    with pytest.raises(ValueError, match="lora_A must be"):
        fastlora.prepare_lora_linear_4bit(torch.randn(1, K, dtype=torch.bfloat16), packed,
                                          state, a[:, :-1], b, 2.0)


def test_prepared_group_equals_the_general_path(monkeypatch):
    """fused_group_forward (q/k/v-like: ranks 8, 8, 16, one with a bias): the prepared call
    equals the group op's output, and the members' own single-layer calls, bit for bit, in
    one U launch and one GEMM launch, with the members checked once."""
    layers = []
    for i, (n, rank, bias) in enumerate([(48, 8, True), (32, 8, False), (32, 16, False)]):
        torch.manual_seed(i)
        layer = fastlora.LoRALinear4bit.from_linear(nn.Linear(K, n, bias=bias), r=rank,
                                                    lora_alpha=16,
                                                    compute_dtype=torch.bfloat16)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
        layers.append((layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling,
                       layer.lora_dropout))
    x = torch.randn(1, 3, K)  # M = 3: the group GEMM (at M <= 2 each member's one launch)
    with torch.enable_grad():
        want = [y.detach() for y in modules.fused_group_forward(x, layers)]
    from fastlora.ops import group as group_op
    checks = []
    real = group_op.check_group
    monkeypatch.setattr(group_op, "check_group", lambda *a, **kw: checks.append(1) or
                        real(*a, **kw))
    with torch.no_grad(), counting(execute=True) as launches:
        got = [modules.fused_group_forward(x, layers) for _ in range(2)]
    # one U launch and one GEMM launch for the three members (issue 29)
    assert launches == {"_lora_u_group_kernel": 2, "_nf4_lora_fwd_small_m_group_kernel": 2}, \
        launches
    with torch.no_grad():  # the members one by one (single-layer prepared calls)
        alone = [modules.fused_lora_forward(x, *layer) for layer in layers]
    assert all(torch.equal(y, w) for y, w in zip(alone, want))
    assert len(checks) == 1
    for ys in got:
        assert len(ys) == 3 and all(torch.equal(y, w) for y, w in zip(ys, want))
    with torch.no_grad():  # a member changed: the group's call is prepared again
        layers[2][2].weight.mul_(-1.0)
        ys = modules.fused_group_forward(x, layers)
    assert len(checks) == 2
    with torch.enable_grad():
        want = [y.detach() for y in modules.fused_group_forward(x, layers)]
    assert all(torch.equal(y, w) for y, w in zip(ys, want))


@pytest.mark.parametrize("grouped", [False, True], ids=["per-layer", "grouped"])
def test_patched_decode_step_uses_prepared_calls(tmp_path, grouped):
    """A patched tiny Llama's M = 1 forward under no_grad (a decode step): the same logits as
    with autograd on (the general path), the same launches, and every LoRA layer's call
    prepared."""
    import tiny_models as tm

    model = tm.add_lora(tm.load_4bit(tm.save_tiny_llama(tmp_path)))
    fastlora.patch(model, group=grouped)
    ids, _ = tm.token_batch(1, 1)
    model(ids)  # learns the groups
    with torch.enable_grad(), counting(execute=True) as general:
        want = model(ids).logits.detach()
    with torch.no_grad():
        model(ids)  # prepares
        with counting(execute=True) as prepared:
            got = model(ids).logits
    assert torch.equal(got, want)
    assert prepared == general, (prepared, general)
    entries = [call for module in model.modules() if module in modules._PREPARED
               for _, call in modules._PREPARED[module].values()]
    layers = len(model.base_model.model.model.layers)
    assert len(entries) == layers * (4 if grouped else 7) and all(entries)


def test_patched_dora_decode_step_reads_each_weight_once(tmp_path):
    """A patched tiny Llama with PEFT DoRA on all seven projections, M = 1 under no_grad: the
    logits of the general path (autograd on), every layer's call prepared, and no weight-norm
    pass in a decode step once prepared (the general path makes one a layer a call)."""
    import tiny_models as tm

    model = tm.add_lora(tm.load_4bit(tm.save_tiny_llama(tmp_path)), use_dora=True)
    fastlora.patch(model)
    ids, _ = tm.token_batch(1, 1)
    with torch.enable_grad(), counting(execute=True) as general:
        want = model(ids).logits.detach()
    layers = len(model.base_model.model.model.layers)
    assert general["_dora_norm_kernel"] == 7 * layers, general
    with torch.no_grad():
        model(ids)  # prepares
        with counting(execute=True) as prepared:
            got = model(ids).logits
    assert torch.equal(got, want)
    assert "_dora_norm_kernel" not in prepared and "_dora_scales_kernel" not in prepared
    entries = [call for module in model.modules() if module in modules._PREPARED
               for _, call in modules._PREPARED[module].values()]
    assert len(entries) == 7 * layers and all(entries)


def _dora(bias: bool, dtype=torch.bfloat16):
    """A layer and a DoRA magnitude for it (the row norms of its weight, perturbed, fp32 as
    PEFT keeps it): (layer, magnitude, x -> fused_dora_forward)."""
    layer = _layer(dtype, bias)
    torch.manual_seed(1)
    magnitude = nn.Parameter(torch.rand(N) + 0.5)

    def call(x):
        return modules.fused_dora_forward(x, layer.base_layer, layer.lora_A, layer.lora_B,
                                          layer.scaling, layer.lora_dropout, magnitude)
    return layer, magnitude, call


@pytest.mark.parametrize("bias,m", [(False, 1), (False, 5), (True, 3)],
                         ids=["scaled-m1", "scaled-m5", "bias-m3"])
def test_prepared_dora_equals_the_general_path(bias, m):
    """A DoRA layer's no-grad call at M <= 16 runs prepared (fastlora.prepare_dora_linear_4bit):
    bit for bit the op's output, with the weight norm (a pass over the whole packed weight)
    made once for all calls instead of once a call, and every change to the magnitude or
    the adapter reaching the next call."""
    layer, magnitude, call = _dora(bias)
    x = torch.randn(m, K)
    with torch.enable_grad(), counting(execute=True) as general:
        want = call(x).detach()
    assert general["_dora_norm_kernel"] == 1, general
    with torch.no_grad(), counting(execute=True) as launches:
        got = [call(x) for _ in range(3)]
    assert all(torch.equal(y, want) for y in got)
    assert _prepared_entries(layer), "the prepared path did not serve"
    assert launches["_dora_norm_kernel"] == 1 and launches["_dora_scales_kernel"] == 1, \
        launches
    forward = {name: n for name, n in general.items() if name not in
               ("_dora_norm_kernel", "_dora_scales_kernel")}
    # each call: the plain layer's forward launches (with a bias, and the combine)
    assert {name: launches[name] for name in forward} == {name: 3 * n
                                                           for name, n in forward.items()}
    for change in (lambda: magnitude.mul_(1.5), lambda: layer.lora_B.weight.mul_(-0.5),
                   lambda: layer.lora_A.weight.add_(0.01)):
        with torch.no_grad():
            before = call(x)
            change()
            after = call(x)
        assert not torch.equal(after, before)
        with torch.enable_grad():
            assert torch.equal(after, call(x).detach())
    # against float64 truth on the inputs the layer computes with (cast to bf16), plain
    # PyTorch in bf16 setting the bound
    truth, plain = (_dora_reference(layer, magnitude, x, bias, dtype)
                    for dtype in (torch.float64, torch.bfloat16))
    assert_close("y", after, truth, plain, torch.bfloat16)


def _dora_reference(layer, magnitude, x, bias, dtype):
    """fastlora.reference's DoRA layer on the layer's bf16 inputs, computed in `dtype`."""
    def cast(t):
        return t.detach().to(torch.bfloat16).to(dtype)
    return reference.dora_linear_4bit(
        cast(x), layer.base_layer.weight.data, modules.bnb_quant_state(layer.base_layer),
        cast(layer.lora_A.weight), cast(layer.lora_B.weight), layer.scaling,
        magnitude.detach().to(dtype), cast(layer.base_layer.bias) if bias else None)


def test_prepare_dora_returns_none_where_the_general_path_decides():
    layer, magnitude, _ = _dora(False)
    state = modules.bnb_quant_state(layer.base_layer)
    a = layer.lora_A.weight.to(torch.bfloat16)
    b = layer.lora_B.weight.to(torch.bfloat16)
    packed = layer.base_layer.weight.data
    with counting(execute=True) as launches:
        for m in (0, 17):
            x = torch.randn(m, K, dtype=torch.bfloat16)
            assert fastlora.prepare_dora_linear_4bit(x, packed, state, a, b, 2.0,
                                                     magnitude) is None
    assert not launches  # no norm pass made for a call that cannot be prepared
    with pytest.raises(ValueError, match="magnitude"):
        fastlora.prepare_dora_linear_4bit(torch.randn(1, K, dtype=torch.bfloat16), packed,
                                          state, a, b, 2.0, magnitude[:-1])


def _mixed(ranks, seed=0):
    """A bf16 base layer and adapters (lora_A, lora_B, scaling, dropout) of these ranks for
    fused_mixed_forward; the adapters' weights fp32, as PEFT keeps them."""
    layer = _layer(torch.bfloat16, bias=True)
    torch.manual_seed(seed)
    adapters = []
    for i, rank in enumerate(ranks):
        lora_A, lora_B = nn.Linear(K, rank, bias=False), nn.Linear(rank, N, bias=False)
        with torch.no_grad():
            lora_B.weight.normal_(0, 0.1)
        adapters.append((lora_A, lora_B, 0.5 + i, nn.Dropout(0.1).eval()))
    return layer, adapters


@pytest.mark.parametrize("ranks,launched", [
    ((8, 8, 16), {"_lora_u_kernel": 3, "_nf4_lora_fwd_small_m_kernel": 3}),
    ((32, 32, 16), {"_nf4_lora_fwd_small_m_kernel": 3})],  # wide: U by one matmul
    ids=["kernels", "wide"])
def test_prepared_mixed_equals_the_general_path(monkeypatch, ranks, launched):
    """A mixed batch's no-grad call at M <= 16 (fused_mixed_forward, PEFT's adapter_names at a
    decode step; dropout modules in eval) runs prepared (fastlora.prepare_mixed_linear_4bit):
    bit for bit the op's output, the arguments and routing checked once and the adapters
    joined and cast once, the same launches; an in-place change of an adapter and another
    routing reach the next call."""
    from fastlora import checks
    from fastlora.ops import mixed as mixed_op

    layer, adapters = _mixed(ranks)
    x = torch.randn(4, 1, K)  # four samples of one token: M = 4
    slots = (2, -1, 0, 2)

    def call(slots_=slots):
        return modules.fused_mixed_forward(x, layer.base_layer, adapters, slots_)
    with torch.enable_grad():
        want = call().detach()
    checked, joined = [], []
    real_check, real_cat = mixed_op.check_mixed, torch.cat
    monkeypatch.setattr(mixed_op, "check_mixed", lambda *a, **kw: checked.append(1) or
                        real_check(*a, **kw))
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: joined.append(1) or real_cat(*a, **kw))
    with torch.no_grad(), counting(execute=True) as launches:
        got = [call() for _ in range(3)]
    monkeypatch.setattr(torch, "cat", real_cat)
    assert all(torch.equal(y, want) and y.dtype == x.dtype for y in got)
    assert len(checked) == 1 and len(joined) == 2  # A's and B's, once
    assert launches == launched, launches
    assert [call for _, call in modules._PREPARED[adapters[0][0]].values()] != [None]
    with torch.no_grad():
        before = call()
        adapters[2][1].weight.mul_(-1.0)
        after = call()
        other = call((1, 1, 0, -1))
    assert len(checked) == 3  # prepared again for the change, and for the other routing
    assert not torch.equal(after, before)
    with torch.enable_grad():
        assert torch.equal(after, call().detach())
        assert torch.equal(other, call((1, 1, 0, -1)).detach())
    # against float64 truth on the bf16 inputs the layer computes with
    rows = torch.tensor(slots)
    truth, plain = (reference.mixed_linear_4bit(
        x.to(torch.bfloat16).to(dtype), layer.base_layer.weight.data,
        modules.bnb_quant_state(layer.base_layer),
        [checks.MixedAdapter(a.weight.to(torch.bfloat16).to(dtype),
                             b.weight.to(torch.bfloat16).to(dtype), s)
         for a, b, s, _ in adapters], rows,
        layer.base_layer.bias.to(torch.bfloat16).to(dtype))
        for dtype in (torch.float64, torch.bfloat16))
    assert_close("y", after, truth, plain, torch.bfloat16)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_syncs_nothing_and_compiles(tmp_path):
    """Issue 29, part 4, what the CPU can show: a prepared decode call reads no value back to
    the host (no aten._local_scalar_dense, the op behind .item() / int(tensor), no copy
    between devices) and allocates only through torch (empty); under torch.compile
    (fullgraph, no graph break) the no-grad M = 1 step gives the eager logits."""
    import tiny_models as tm

    model = tm.add_lora(tm.load_4bit(tm.save_tiny_llama(tmp_path)))
    fastlora.patch(model, group=True)
    ids, _ = tm.token_batch(1, 1)
    model(ids)  # learns the groups
    model(ids)  # forms them (fastlora.grouping.GroupHook, at a model forward)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 1, attn.q_proj.in_features, dtype=torch.bfloat16)  # the compute dtype
    with torch.no_grad():
        for layer in (attn.o_proj, attn.q_proj):
            layer(x[..., :layer.in_features])  # prepares
        # the launches recorded, not run: the interpreter's own copies are not the op's
        with counting() as launches, _RecordOps() as single:
            attn.o_proj(x[..., :attn.o_proj.in_features])
        with counting() as launches, _RecordOps() as group:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, name)(x)
    # M = 1: each member's one-launch CUDA-core forward (csrc_triton/gemv.py)
    assert launches == {"_nf4_lora_gemv_kernel": 3}, launches
    for recorded in (single, group):
        assert recorded.ops, "nothing ran"
        assert not [op for op in recorded.ops if "_local_scalar_dense" in op
                    or "_to_copy" in op or "copy_" in op], recorded.ops
        # views (the test's slice of x included) and the outputs / workspaces
        assert {".".join(op.split(".")[:2]) for op in recorded.ops} <= {
            "aten.empty", "aten.zeros", "aten.view", "aten._unsafe_view", "aten.alias",
            "aten.slice"}, recorded.ops
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert torch.equal(got, want)
