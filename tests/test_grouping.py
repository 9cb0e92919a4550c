"""Groups of patched layers that read one input (issue 13, fastlora/grouping.py and patch):
the tracker's learning and breaks on plain objects, then a real transformers + bitsandbytes +
PEFT tiny Llama (4-bit on the CPU) where q/k/v and gate/up run as fused groups.

Correctness on the model is fastlora.numerics' rule as in test_patch.py: truth = the float64
twin, plain PyTorch = the unpatched PEFT model in the test dtype; the grouped model and the
per-layer patched model must both stay within it for logits, loss and every LoRA gradient.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch

import fastlora
from fastlora import grouping, peft_patch
from fastlora.numerics import compare
import tiny_models as tm


# ----------------------------------------------------------------------------- the tracker

class Layer:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def _calls(tracker, layers, x, log):
    """Each layer's call on x through the tracker; records which path served it."""
    def one(layer):
        log.append(("one", layer.name))
        return torch.full((1,), float(ord(layer.name)))

    def group(members, x_):
        log.append(("group", tuple(m.name for m in members)))
        return [torch.full((1,), float(ord(m.name))) for m in members]
    return [tracker.call(layer, x, lambda layer=layer: one(layer), group) for layer in layers]


@pytest.mark.quick
def test_tracker_learns_forms_and_serves():
    q, k, v, o = (Layer(n) for n in "qkvo")
    tracker = grouping.GroupTracker()
    x, h = torch.zeros(2), torch.zeros(2)
    log = []
    _calls(tracker, [q, k, v], x, log)
    _calls(tracker, [o], h, log)
    assert tracker.groups == [] and all(kind == "one" for kind, _ in log)
    tracker.new_forward(lambda run: True)
    assert tracker.groups == [(q, k, v)] and tracker.sizes() == {3: 1}
    log.clear()
    outs = _calls(tracker, [q, k, v], x, log) + _calls(tracker, [o], h, log)
    assert log == [("group", ("q", "k", "v")), ("one", "o")]
    assert [int(t) for t in outs] == [ord(c) for c in "qkvo"]
    tracker.new_forward(lambda run: True)
    assert tracker.groups == [(q, k, v)]  # the pattern held: kept


@pytest.mark.parametrize("brk", ["other-tensor", "in-place", "order", "missing", "unserved"])
def test_tracker_breaks_fall_back_and_relearn(brk, caplog):
    """Each break: the call runs per layer with its own result, the reason is logged once, the
    groups drop at the next forward and form again once the pattern shows again."""
    q, k, v = (Layer(n) for n in "qkv")
    tracker = grouping.GroupTracker()
    x = torch.zeros(2)
    _calls(tracker, [q, k, v], x, [])
    tracker.new_forward(lambda run: True)
    log = []
    if brk == "other-tensor":
        outs = _calls(tracker, [q], x, log) + _calls(tracker, [k], x.clone(), log) \
            + _calls(tracker, [v], x, log)
    elif brk == "in-place":
        outs = _calls(tracker, [q], x, log)
        x.add_(1)
        outs += _calls(tracker, [k, v], x, log)
    elif brk == "order":
        outs = _calls(tracker, [k, q, v], x, log)
    elif brk == "missing":
        outs = _calls(tracker, [q, k], x, log)
    else:
        outs = _calls(tracker, [q], x, log)
        tracker.unserved(k)  # k's call went to PEFT's forward
        outs += _calls(tracker, [v], x, log)
    names = {"other-tensor": "qkv", "in-place": "qkv", "order": "kqv", "missing": "qk",
             "unserved": "qv"}[brk]
    assert [int(t) for t in outs] == [ord(c) for c in names]
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        tracker.new_forward(lambda run: True)
    assert tracker.groups == []
    want = {"other-tensor": grouping.OTHER_INPUT, "in-place": grouping.MODIFIED,
            "order": grouping.ORDER, "missing": grouping.ORDER,
            "unserved": grouping.UNSERVED}[brk]
    assert [r.getMessage() for r in caplog.records if want in r.getMessage()], caplog.text
    _calls(tracker, [q, k, v], x, [])
    tracker.new_forward(lambda run: True)
    assert tracker.groups == [(q, k, v)]


@pytest.mark.quick
def test_tracker_limits_and_copies():
    """Runs longer than max_members are cut; `fits` can refuse a run; inside a backward pass
    nothing changes; pickling keeps the groups and drops every tensor."""
    layers = [Layer(n) for n in "abcde"]
    tracker = grouping.GroupTracker(max_members=4)
    x = torch.zeros(1)
    _calls(tracker, layers, x, [])
    tracker.new_forward(lambda run: len(run) != 1)
    assert tracker.groups == [tuple(layers[:4])]  # "e" began a new run of one
    refused = grouping.GroupTracker()
    _calls(refused, layers[:2], x, [])
    refused.new_forward(lambda run: False)
    assert refused.groups == []
    _calls(tracker, layers[:1], x, [])  # the group's first member ran: outputs cached
    assert tracker.cache
    clone = pickle.loads(pickle.dumps(tracker))
    assert [tuple(m.name for m in g) for g in clone.groups] == [tuple("abcd")]
    assert clone.cache == {} and clone.run == []


# ----------------------------------------------------------------------------- the model

N_LAYERS = 2 * len(tm.TARGETS)
LLAMA_GROUPS = {2: 2, 3: 2}  # per decoder layer: q/k/v and gate/up


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def group_calls(monkeypatch):
    """Counts the fused group ops that ran (one per group and forward)."""
    calls = []
    real = peft_patch.fused_group_forward

    def counting(x, layers):
        calls.append(len(layers))
        return real(x, layers)
    monkeypatch.setattr(peft_patch, "fused_group_forward", counting)
    return calls


_step = tm.lora_step


def _check(got, truth, baseline, dtype, what):
    bad = [c.message() for c in (compare(f"{what} {k}", got[k], truth[k], baseline[k], dtype)
                                 for k in truth) if not c.ok]
    assert not bad, "\n".join(bad)


RANKS = {"q_proj": 4, "k_proj": 8, "v_proj": 16, "gate_proj": 12, "up_proj": 6}


@pytest.mark.parametrize("dtype,ranks", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.bfloat16, RANKS)],
                         ids=["fp32", "bf16", "bf16-ranks"])
def test_grouped_model_matches_per_layer_and_peft(model_dir, group_calls, dtype, ranks):
    """Forward and every LoRA gradient: the grouped patched model, the per-layer patched model
    (patch(group=False)) and unpatched PEFT, each against the float64 twin; the same ranks
    everywhere or a different rank per projection (LoraConfig rank_pattern)."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=dtype),
                        **({"rank_pattern": ranks} if ranks else {}))
    model.train()
    truth = _step(tm.float64_twin(model_dir, model).train())
    baseline = _step(model)
    assert fastlora.patch(model, group=False).trackers == []
    per_layer = _step(model)
    report = fastlora.patch(model)
    assert report.groups == {} and report.candidates == 4
    _step(model)  # learns the groups, which form as the next forward starts
    assert report.groups == {} and group_calls == []
    grouped = _step(model)
    assert report.groups == LLAMA_GROUPS and sorted(group_calls) == [2, 2, 3, 3]
    assert "groups sharing an input: 2 of 2, 2 of 3" in str(report)
    for what, got in (("grouped", grouped), ("per-layer", per_layer)):
        _check(got, truth, baseline, dtype, what)


_logits = tm.logits
_close = tm.assert_close_fp32


def test_breaks_on_the_model_fall_back_with_the_same_results(model_dir, group_calls, caplog):
    """A pre-hook hands k_proj a copy of the hidden states (another tensor): that forward runs
    those layers per layer with PEFT's results, logs the reason once, and the next forwards
    learn the pattern that now holds (layer 0's q, k and v each alone). A merged
    member (k_proj of layer 0) leaves its group to PEFT for that call, same results."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    want = _logits(model)
    report = fastlora.patch(model)
    _logits(model)
    _logits(model)
    assert report.groups == LLAMA_GROUPS
    attn = model.base_model.model.model.layers[0].self_attn
    handle = attn.k_proj.register_forward_pre_hook(lambda mod, args: (args[0].clone(),))
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        _close(_logits(model), want, "k_proj given a copy")
        _close(_logits(model), want, "after the break")
        _close(_logits(model), want, "relearned")
    warned = [r.getMessage() for r in caplog.records if grouping.OTHER_INPUT in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert report.groups == {2: 2, 3: 1}  # layer 0 keeps gate/up only
    handle.remove()
    _logits(model)
    _logits(model)
    assert report.groups == LLAMA_GROUPS
    attn.k_proj.merge()
    unpatched_merged = copy.deepcopy(model)
    fastlora.unpatch(unpatched_merged)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        _close(_logits(model), _logits(unpatched_merged), "a merged member")
    assert any(grouping.UNSERVED in r.getMessage() or peft_patch.MERGED in r.getMessage()
               for r in caplog.records)


def test_groups_survive_pickle_and_deepcopy_and_unpatch_removes_them(model_dir, group_calls):
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    fastlora.patch(model)
    _logits(model)
    want = _logits(model)
    assert sorted(group_calls) == [2, 2, 3, 3]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        del group_calls[:]
        assert torch.equal(_logits(other), want)
        assert sorted(group_calls) == [2, 2, 3, 3]  # grouped from the first call
        hooks = [h for h in other._forward_pre_hooks.values()
                 if isinstance(h, grouping.GroupHook)]
        assert len(hooks) == 1
        assert fastlora.unpatch(other) == N_LAYERS
        assert not any(isinstance(h, grouping.GroupHook)
                       for h in other._forward_pre_hooks.values())


def test_compiled_model_runs_per_layer_with_grouped_eager_results(model_dir, group_calls):
    """torch.compile (aot_eager, fullgraph) of a model whose groups are formed: one graph, no
    break (the trackers are not traced), and the compiled step's loss and gradients equal the
    grouped eager step's (fp32)."""
    model = tm.add_lora(tm.load_4bit(model_dir, compute_dtype=torch.float32))
    model.train()
    fastlora.patch(model)
    _step(model)
    eager = _step(model)
    assert sorted(group_calls) == [2, 2, 3, 3]
    ids, labels = tm.token_batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons
    compiled = _step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    assert len(group_calls) == 4  # nothing grouped while compiled
    compiled = {name.removeprefix("_orig_mod."): t for name, t in compiled.items()}
    assert set(compiled) == set(eager)
    for name in eager:
        _close(compiled[name], eager[name], f"compiled {name}")
