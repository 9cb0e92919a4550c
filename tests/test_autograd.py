"""Autograd behaviour of fastlora.lora_linear_4bit (issue 4): what the op saves and
allocates, which gradients it computes, autocast, views, gradient checkpointing, in-place
modification; and the reference path's own backward (gradcheck in float64)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastlora
import fastlora.launch.backward as launch_backward
import fastlora.launch.forward as launch_forward
import fastlora.ops.dequant as ops_dequant
from fastlora import quant, reference
from fastlora.quant import dequantize_4bit_torch
from helpers import DEVICE, RecordCreated, bnb_weight, make_case

M, N, K, R = 17, 72, 200, 8  # M < N: any floating tensor with N * K elements is a weight


def layer(dtype=torch.bfloat16, bias=True, p=0.1, seed=31):
    """(inputs dict of fresh leaves requiring grad, call(inputs) -> y) for one layer."""
    case = make_case(M, N, K, R, dtype, bias=bias, dropout_p=p, seed=2)
    leaves = {"x": case.x, "lora_A": case.lora_A, "lora_B": case.lora_B, "bias": case.bias}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if v is not None}

    def call(t, **overrides):
        kw = {**dict(bias=t.get("bias"), dropout_p=p, training=p > 0, seed=seed), **overrides}
        return fastlora.lora_linear_4bit(t["x"], case.packed, case.state, t["lora_A"],
                                         t["lora_B"], case.scaling, **kw)
    return leaves, call, case


def grads_of(leaves, y, dy=None):
    y.backward(torch.ones_like(y) if dy is None else dy)
    return {k: v.grad for k, v in leaves.items()}


def assert_same(got: dict, expected: dict):
    for name, g in expected.items():
        assert got[name] is not None, f"{name}: no gradient"
        assert got[name].dtype == g.dtype, f"{name}: {got[name].dtype} vs {g.dtype}"
        assert torch.equal(got[name], g), \
            f"{name}: differs by up to {float((got[name].double() - g.double()).abs().max()):.3e}"


# ----------------------------------------------------------------------------- memory

@pytest.mark.quick
def test_never_a_dense_weight(monkeypatch):
    """Forward + backward on the fused path: full dequantisation is never called, no floating
    tensor of N * K elements (or more) is created, and nothing saved for backward is a
    dequantised weight or a dropout mask (a bool tensor). The fused path is forced: on a GPU
    the auto dispatcher would also time the dequantize path, whose buffer is [N, K]."""
    monkeypatch.setenv("FASTLORA_BASE_PATH", "fused")
    def forbidden(*args, **kwargs):
        raise AssertionError("the fused path dequantised the whole weight")
    monkeypatch.setattr(quant, "dequantize_4bit_torch", forbidden)
    monkeypatch.setattr(reference, "dequantize_4bit_torch", forbidden)
    monkeypatch.setattr(ops_dequant, "dequantize_4bit", forbidden)
    monkeypatch.setattr(fastlora, "dequantize_4bit", forbidden)

    created = []

    # A dispatch mode is switched off while it runs an op, so the custom ops' bodies (the
    # launchers, where workspaces and outputs are allocated) would be invisible to the outer
    # record: record inside them too.
    def recorded(launcher):
        def run_recorded(*args, **kwargs):
            with RecordCreated(created):
                return launcher(*args, **kwargs)
        return run_recorded
    monkeypatch.setattr(launch_forward, "lora_forward", recorded(launch_forward.lora_forward))
    monkeypatch.setattr(launch_backward, "lora_backward",
                        recorded(launch_backward.lora_backward))

    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    leaves, call, _ = layer()
    with RecordCreated(created), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = call(leaves)
        y.backward(torch.ones_like(y))
    assert all(v.grad is not None for v in leaves.values())
    shapes = {c[1] for c in created}
    assert (M, N) in shapes and (M, R) in shapes, "the launchers' y and U were not recorded"
    assert (M, K) in shapes, "the backward launcher's dx was not recorded"
    dense = [c for c in created if c[2].is_floating_point and torch.Size(c[1]).numel() >= N * K]
    assert not dense, f"floating tensors as large as the weight were created: {dense}"
    assert (tuple(leaves["x"].shape), torch.bfloat16) in saved
    assert not [s for s in saved if s[1] == torch.bool], f"a mask was saved: {saved}"
    assert not [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= N * K]


def test_dequant_path_keeps_one_shared_dense_weight(monkeypatch):
    """On the dequantize + cuBLAS path the one dense [N, K] tensor is the shared buffer
    (fastlora/launch/buffer.py): allocated by the first call, reused by the backward and by the
    next step (same storage), and never saved for backward."""
    from fastlora.launch import buffer

    monkeypatch.setenv("FASTLORA_BASE_PATH", "dequant")
    buffer.release_dequant_buffer()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    leaves, call, _ = layer()
    storage = set()
    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = call(leaves)
        y.backward(torch.ones_like(y))
        storage |= {(b.data_ptr(), b.numel()) for b in buffer._BUFFERS.values()}
    assert storage and len(storage) == 1 and next(iter(storage))[1] == N * K, storage
    assert not [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= N * K]
    buffer.release_dequant_buffer()


# ----------------------------------------------------------------------------- needs_input_grad

@pytest.mark.parametrize("trainable,flags", [
    (("lora_A", "lora_B", "bias"), (False, True, True)),   # x needs no grad (first layer)
    (("x", "bias"), (True, False, False)),                 # frozen adapter
    (("lora_B",), (False, False, True)),
], ids=["no-dx", "frozen-adapter", "only-dB"])
@pytest.mark.quick
def test_needs_input_grad(monkeypatch, trainable, flags, base_path):
    """The backward asks the kernels for exactly the gradients autograd needs, and those are
    bit-identical to the ones of a run where everything is trainable."""
    leaves, call, _ = layer()
    full = grads_of(leaves, call(leaves))
    asked = []
    real = launch_backward.lora_backward

    def spy(*args, **kwargs):
        asked.append(tuple(args[-3:]))
        return real(*args, **kwargs)
    monkeypatch.setattr(launch_backward, "lora_backward", spy)
    part = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in leaves.items()}
    got = grads_of(part, call(part))
    assert asked == [flags], f"backward asked for (dx, dA, dB) = {asked}, expected {flags}"
    assert_same({k: got[k] for k in trainable}, {k: full[k] for k in trainable})
    assert all(got[k] is None for k in part if k not in trainable)


# ----------------------------------------------------------------------------- dtypes and views

def test_autocast_gives_parameter_dtypes(base_path):
    """fp32 parameters under bf16 autocast: the op runs in bf16, gradients come back in fp32,
    equal to casting by hand."""
    leaves, call, _ = layer(torch.float32, seed=77)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = call(leaves)
    assert y.dtype == torch.bfloat16
    got = grads_of(leaves, y)
    by_hand = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in leaves.items()}
    expected = {k: g.float() for k, g in grads_of(by_hand, call(by_hand)).items()}
    assert_same(got, expected)


def test_views(base_path):
    """x as a non-contiguous 3-D view (strides (1, M) once flattened: the kernels read it in
    place) and lora_A as a transposed view: the gradients reach the underlying tensors, equal
    to those of contiguous inputs."""
    leaves, call, _ = layer(torch.float16)
    expected = grads_of(leaves, call(leaves))
    x_km = leaves["x"].detach().t().contiguous().requires_grad_()  # [K, M]
    a_kr = leaves["lora_A"].detach().t().contiguous().requires_grad_()  # [K, R]
    views = {"x": x_km.t().unsqueeze(0), "lora_A": a_kr.t(),  # [1, M, K], [R, K]
             "lora_B": leaves["lora_B"], "bias": leaves["bias"]}
    assert not views["x"].is_contiguous() and not views["lora_A"].is_contiguous()
    leaves["lora_B"].grad = leaves["bias"].grad = None
    call(views).backward(torch.ones(1, M, N, dtype=torch.float16, device=DEVICE))
    assert_same({"x": x_km.grad.t(), "lora_A": a_kr.grad.t(), "lora_B": leaves["lora_B"].grad,
                 "bias": leaves["bias"].grad}, expected)


# ----------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_reproduces_dropout(reentrant, base_path):
    """With the seed drawn from torch's generator (seed=None), recomputing the forward inside
    torch.utils.checkpoint draws the same seed, hence the same mask: gradients equal those of
    the plain run; a different generator state gives different ones (dropout is live)."""
    leaves, call, _ = layer(seed=None)

    def fn(x, a, b, bias):
        return call({"x": x, "lora_A": a, "lora_B": b, "bias": bias})
    args = [leaves[k] for k in ("x", "lora_A", "lora_B", "bias")]
    torch.manual_seed(123)
    plain = grads_of(leaves, fn(*args))
    for v in leaves.values():
        v.grad = None
    torch.manual_seed(123)
    y = checkpoint(fn, *args, use_reentrant=reentrant)
    torch.manual_seed(999)  # the recomputation must not depend on the generator now
    assert_same(grads_of(leaves, y), plain)
    for v in leaves.values():
        v.grad = None
    torch.manual_seed(124)
    other = grads_of(leaves, fn(*args))
    assert not torch.equal(other["lora_A"], plain["lora_A"])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_dropout_draws_a_fresh_seed_each_step(compiler):
    """Issue 30: under torch.compile (fullgraph) the op's seed draw (fastlora.checks
    seed_tensor: an int64 [1] tensor on x's device, read by the kernels there) is part of the
    graph, so each compiled step draws a fresh seed from torch's generator and a fresh mask,
    and each step's output and gradients equal, bit for bit, the eager op's with that seed
    passed explicitly (which tests/test_reference.py and the kernel tests tie to
    fastlora.reference's mask). The seed a step drew is recovered by replaying torch's
    generator from its state before the step (inductor with fallback_random, so that its
    graph draws through torch's generator as eager does)."""
    leaves, call, _ = layer(dtype=torch.float32, bias=False, seed=None, p=0.3)
    names = ("x", "lora_A", "lora_B")  # no bias: inductor sums dy its own way for dbias

    def step(x, a, b):
        return call({"x": x, "lora_A": a, "lora_B": b})
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    runs = []
    with torch._inductor.config.patch(fallback_random=True):
        for _ in range(2):
            args = [leaves[k].detach().clone().requires_grad_() for k in names]
            before = torch.get_rng_state()
            y = compiled(*args)
            y.square().sum().backward()
            after = torch.get_rng_state()
            torch.set_rng_state(before)
            seed = int(torch.randint(0, 2**31 - 1, (1,)))  # seed_tensor's draw, replayed
            torch.set_rng_state(after)
            want = {k: v.detach().clone().requires_grad_() for k, v in zip(names, args)}
            y_want = call(want, seed=seed)
            y_want.square().sum().backward()
            assert torch.equal(y.detach(), y_want.detach()), "compiled y != eager y at its seed"
            assert_same({k: a.grad for k, a in zip(names, args)},
                        {k: v.grad for k, v in want.items()})
            runs.append((seed, y.detach()))
    torch._dynamo.reset()
    (seed0, y0), (seed1, y1) = runs
    assert seed0 != seed1 and not torch.equal(y0, y1), "two compiled steps drew one mask"


# ----------------------------------------------------------------------------- in-place

@pytest.mark.parametrize("target", ["x", "lora_A"])
def test_saved_tensor_modified_in_place(target):
    leaves, call, _ = layer()
    inputs = dict(leaves, x=leaves["x"] * 1)  # a non-leaf x that may be modified in place
    y = call(inputs)
    with torch.no_grad():
        inputs[target].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


# ----------------------------------------------------------------------------- the reference

def _reference_inputs(p):
    packed, state = bnb_weight(6, 40, blocksize=64, dtype=torch.float32, seed=4)
    g = torch.Generator().manual_seed(4)
    t = [torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
         for shape in ((2, 3, 40), (5, 40), (6, 5), (6,))]
    return packed, state, t


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_reference_gradcheck(p):
    """torch.autograd.gradcheck of the reference's explicit backward, float64, 3-D x."""
    packed, state, inputs = _reference_inputs(p)

    def f(x, a, b, bias):
        return reference.lora_linear_4bit(x, packed, state, a, b, 1.5, bias, p, True, 42)
    assert torch.autograd.gradcheck(f, inputs)


def test_reference_backward_equals_autograd_of_plain_ops():
    """The reference's hand-written backward against torch.autograd through plain ops."""
    p, seed, s = 0.3, 42, 1.5
    packed, state, (x, a, b, bias) = _reference_inputs(p)
    y = reference.lora_linear_4bit(x, packed, state, a, b, s, bias, p, True, seed)
    dy = torch.randn_like(y)
    explicit = torch.autograd.grad(y, (x, a, b, bias), dy)
    x2 = x.reshape(-1, 40)
    w = dequantize_4bit_torch(packed, state, torch.float64)
    plain = (x2 @ w.t() + s * reference.apply_dropout(x2, seed, p) @ a.t() @ b.t()
             + bias).reshape(y.shape)
    for name, e, q in zip(("x", "A", "B", "bias"), explicit,
                          torch.autograd.grad(plain, (x, a, b, bias), dy)):
        torch.testing.assert_close(e, q, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")
