"""`fastlora.patch` / `fastlora.unpatch`: send PEFT's LoRA layers over bitsandbytes 4-bit bases
(`peft.tuners.lora.bnb.Linear4bit`) through the fused op, in place.

A patched layer keeps every module and parameter object it had; only its `forward` changes (an
instance attribute that shadows the class's: a small picklable callable holding the layer, so
`torch.save(model)` / `torch.load` and `copy.deepcopy` keep the patch), so optimizer state,
`save_pretrained`, `load_adapter`, `set_adapter`, `merge_and_unload` and checkpoints see nothing
different. The patched forward reads the layer's state at every call (active adapter, scaling,
dropout p and train/eval, merged/disabled) and hands the call to PEFT's own forward whenever
the fused path cannot serve it (e.g. inside `with model.disable_adapter():`); such a hand-over
is logged at WARNING, once per reason per process, so nothing runs slow silently.

Mixed batches (PEFT's `adapter_names=`, generate included, and `adapter_batch` for training)
run as one fused op per layer, fastlora.mixed_linear_4bit: one base GEMM over the whole batch,
each sample's LoRA term from its own adapter ("__base__": none). Names of DoRA or other
variant adapters, adapters with lora_bias, or ranks summing past 256 go to PEFT (the reason
logged once); so do calls PEFT refuses (it raises its own error).

Layers that read one input in a forward (q/k/v, gate/up) are also run as one fused group op
from the next forward on (fastlora/grouping.py; `patch(model, group=False)` turns it off).

`patch` serves a layer when one active adapter lives in it (several: patched for mixed batches,
plain calls then go to PEFT), that adapter is plain LoRA
or DoRA (`use_dora=True`: fastlora.dora_linear_4bit; not aLoRA, Arrow or another variant) of
rank 1..256, it is neither merged nor disabled, its weights and the compute dtype are
fp16/bf16/fp32, its dropout is nn.Dropout or nn.Identity, and the base weight has a quant_state
that describes it in bitsandbytes' standard layout (for DoRA: with in_features a multiple of
the quantisation blocksize). Other layers keep
PEFT's forward and are listed in the report under their reason (REASONS); the log gets one
line per reason.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .modules import (bnb_quant_state, fused_dora_forward, fused_group_forward, fused_lora_forward,
                      fused_mixed_forward)
from .checks import ACTIVATION_DTYPES, MAX_FUSED_RANK
from .grouping import GroupHook, GroupTracker
from .quant import QuantState

__all__ = ["patch", "unpatch", "adapter_batch", "PatchReport", "REASONS"]

logger = logging.getLogger("fastlora")

# why a layer keeps PEFT's forward (PatchReport.skipped keys)
DISABLED = "adapters disabled"
MERGED = "adapter merged into the base weight"
NO_ACTIVE = "no active adapter in this layer"
SEVERAL = "several active adapters"
VARIANT = "LoRA variant other than DoRA (aLoRA, Arrow, ...)"
DORA_BLOCKS = "DoRA over a weight whose quantisation blocks straddle rows (in_features % blocksize)"
DROPOUT = "dropout module is not nn.Dropout or nn.Identity"
RANK = f"LoRA rank above {MAX_FUSED_RANK} (the fused kernels support ranks 1..{MAX_FUSED_RANK})"
DTYPE = "unsupported dtype (adapter weights and compute dtype must be fp16, bf16 or fp32)"
NO_STATE = "missing quant_state"
BAD_STATE = "inconsistent quant_state"
CPU_PACKED = "weight repacked by bitsandbytes for its CPU inference kernel"
WRAPPED = "forward already replaced on the instance (e.g. an accelerate hook)"
# call-time only: the patched forward hands these calls to PEFT
EXTRA_ARGS = "extra forward arguments"
MIXED_INVALID = "adapter_names PEFT refuses (not one name per sample, or merged adapters)"
MIXED_VARIANT = "a mixed batch naming a DoRA or other variant adapter"
MIXED_LORA_BIAS = "a mixed batch naming an adapter with lora_bias"
MIXED_RANK = (f"a mixed batch whose adapters' ranks sum past {MAX_FUSED_RANK} (the fused "
              "kernels' rank)")
REASONS = (DISABLED, MERGED, NO_ACTIVE, SEVERAL, VARIANT, DORA_BLOCKS, DROPOUT, RANK, DTYPE,
           NO_STATE, BAD_STATE, CPU_PACKED, WRAPPED, EXTRA_ARGS, MIXED_INVALID, MIXED_VARIANT,
           MIXED_LORA_BIAS, MIXED_RANK)


@dataclass
class PatchReport:
    """What `patch` did: `patched` layers run fused; `skipped` maps a reason (REASONS) to the
    names (as in model.named_modules()) of the LoRA 4-bit layers that keep PEFT's forward.

    `groups` ({group size: count}) is read live: groups of patched layers that read one input
    (q/k/v, gate/up) are learned in a model forward and form as the next one starts
    (fastlora/grouping.py), so it is {} right after `patch` and after the first forward, and
    e.g. {2: L, 3: L} for an L-layer Llama from the second forward on; `candidates` is how
    many parent modules hold two or more patched layers."""
    patched: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    trackers: list = field(default_factory=list, repr=False, compare=False)

    @property
    def candidates(self) -> int:
        return len(self.trackers)

    @property
    def groups(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for tracker in self.trackers:
            for size, count in tracker.sizes().items():
                out[size] = out.get(size, 0) + count
        return dict(sorted(out.items()))

    def __str__(self) -> str:
        lines = [f"fastlora.patch: {self.patched} layer(s) fused"]
        if self.trackers:
            formed = ", ".join(f"{count} of {size}" for size, count in self.groups.items())
            lines.append(f"  groups sharing an input: {formed or 'none formed yet'} "
                         f"({self.candidates} parent module(s) watched)")
        lines += [f"  skipped {len(names)} ({reason}): {', '.join(names)}"
                  for reason, names in self.skipped.items()]
        return "\n".join(lines)


def _base_of(layer: nn.Module) -> nn.Module:
    """PEFT's layer.get_base_layer() (the innermost `base_layer` submodule), read from the
    module dicts: PEFT's loop ends in a hasattr that raises AttributeError inside
    nn.Module.__getattr__, microseconds at every call (issue 29, host time)."""
    while True:
        inner = layer._modules.get("base_layer")
        if inner is None:
            return layer
        layer = inner


def _parts(layer, adapter: str) -> tuple:
    """(lora_A, lora_B, lora_dropout) modules of `adapter`, read from the module dicts: this
    runs at every call, and nn.Module.__getattr__ costs ~0.5 us a read (issue 29)."""
    modules = layer._modules
    return (modules["lora_A"]._modules[adapter], modules["lora_B"]._modules[adapter],
            modules["lora_dropout"]._modules[adapter])


def _serving_plan(layer) -> tuple:
    """(adapter, None) when the fused path can serve `layer` now, else (None, reason).
    Cheap enough to run at every call."""
    if layer.disable_adapters:
        return None, DISABLED
    if layer.merged:
        return None, MERGED
    lora_a = layer._modules["lora_A"]
    active = [name for name in layer.active_adapters if name in lora_a]
    if not active:
        return None, NO_ACTIVE
    if len(active) > 1:
        return None, SEVERAL
    reason = _adapter_reason(layer, active[0])
    return (active[0], None) if reason is None else (None, reason)


def _adapter_reason(layer, adapter: str):
    """Why the fused op cannot run `adapter` of `layer` (as its one active adapter), or None."""
    kind = variant_kind(layer, adapter)
    if kind not in (None, "dora"):
        return VARIANT
    lora_a, lora_b, dropout = _parts(layer, adapter)
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return DROPOUT
    lora_a, lora_b = lora_a.weight, lora_b.weight
    if lora_a.shape[0] > MAX_FUSED_RANK:  # the kernels' limit
        return RANK
    base = _base_of(layer)
    if lora_a.dtype not in ACTIVATION_DTYPES or lora_b.dtype not in ACTIVATION_DTYPES \
            or base.compute_dtype not in (None,) + ACTIVATION_DTYPES:
        return DTYPE
    state = bnb_quant_state(base)
    if state is None:
        return NO_STATE
    if getattr(state, "packing_format_for_cpu", False):
        return CPU_PACKED
    if kind == "dora" and (state.blocksize <= 0 or base.in_features % state.blocksize):
        return DORA_BLOCKS
    return None


def _mixed_plan(layer, x: torch.Tensor, names) -> tuple:
    """((adapters, slots), None) when the fused mixed-batch op can serve `layer` for
    adapter_names `names` now, else (None, reason). adapters: the distinct names (in order of
    first appearance) that live in this layer, "__base__" and names it lacks giving their
    samples no adapter (PEFT's rule); slots: one index into adapters (or -1) per sample."""
    if layer.disable_adapters:
        return None, DISABLED  # PEFT runs the base alone
    if layer.merged or not isinstance(names, (list, tuple)) or len(names) != len(x) \
            or not all(isinstance(name, str) for name in names):
        return None, MIXED_INVALID  # PEFT raises its own error
    adapters = [name for name in dict.fromkeys(names) if name in layer.lora_A]
    for adapter in adapters:
        if variant_kind(layer, adapter) is not None:
            return None, MIXED_VARIANT
        if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
            return None, DROPOUT
        if layer.lora_B[adapter].bias is not None:
            return None, MIXED_LORA_BIAS
        if layer.lora_A[adapter].weight.dtype not in ACTIVATION_DTYPES \
                or layer.lora_B[adapter].weight.dtype not in ACTIVATION_DTYPES:
            return None, DTYPE
    if sum(layer.lora_A[a].weight.shape[0] for a in adapters) > MAX_FUSED_RANK:
        return None, MIXED_RANK
    base = _base_of(layer)
    if base.compute_dtype not in (None,) + ACTIVATION_DTYPES:
        return None, DTYPE
    state = bnb_quant_state(base)
    if state is None:
        return None, NO_STATE
    if getattr(state, "packing_format_for_cpu", False):
        return None, CPU_PACKED
    slot = {name: i for i, name in enumerate(adapters)}
    return (adapters, tuple(slot.get(name, -1) for name in names)), None


def variant_kind(layer, adapter: str) -> Optional[str]:
    """None for plain LoRA, "dora" for DoRA (recent PEFT holds exactly a DoraLinearVariant in
    lora_variant, a composed variant being something else; older releases flag use_dora; the
    magnitude must live in lora_magnitude_vector), "other" for any other variant."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        from peft.tuners.lora.variants import DoraLinearVariant

        dora = type(variant) is DoraLinearVariant
    elif getattr(layer, "use_dora", {}).get(adapter):
        dora = True
    else:
        return None
    return "dora" if dora and adapter in getattr(layer, "lora_magnitude_vector", {}) else "other"


def is_dora(layer, adapter: str) -> bool:
    return variant_kind(layer, adapter) == "dora"


def _patch_reason(layer):
    """Why `patch` leaves `layer` alone, or None: the call-time plan plus one-off checks."""
    if "forward" in layer.__dict__ and not _is_patched(layer):
        return WRAPPED
    _, reason = _serving_plan(layer)
    if reason == SEVERAL:  # patched all the same: mixed batches (adapter_names,
        # adapter_batch) serve such layers; a plain call goes to PEFT, logged at that call
        reason = next(filter(None, (_adapter_reason(layer, name) for name in
                                    layer.active_adapters if name in layer.lora_A)), None)
    if reason is not None:
        return reason
    base = _base_of(layer)
    state = bnb_quant_state(base)
    try:
        QuantState.from_bnb(state).validate(base.weight.data)
    except (TypeError, ValueError):
        return BAD_STATE
    if tuple(state.shape) != (base.out_features, base.in_features):
        return BAD_STATE
    return None


_fallbacks_logged: set = set()


def _fused_forward(self, x: torch.Tensor, *args, tracker: Optional[GroupTracker] = None,
                   **kwargs) -> torch.Tensor:
    """The forward `patch` installs on a PEFT lora.Linear4bit (through _FusedForward)."""
    names = kwargs.get("adapter_names")
    mixed = None
    if names is not None:
        mixed, reason = _mixed_plan(self, x, names)
    else:
        adapter, reason = _serving_plan(self)
    if reason is None and (args or any(v is not None for k, v in kwargs.items()
                                       if k != "adapter_names")):
        reason = EXTRA_ARGS
    if reason is not None or mixed is not None:
        if tracker is not None:
            tracker.unserved(self)
    if reason is not None:
        if reason not in _fallbacks_logged:  # WARNING: the slow path must not go unnoticed
            _fallbacks_logged.add(reason)
            logger.warning("fastlora: a patched layer runs PEFT's (unfused, slower) forward "
                           "for this call (%s); logged once per reason", reason)
        return type(self).forward(self, x, *args, **kwargs)
    if mixed is not None:
        adapters, slots = mixed
        if not adapters:  # no sample names an adapter of this layer: PEFT runs the base alone
            return _base_of(self)(x)
        return fused_mixed_forward(x, _base_of(self),
                                   [(self.lora_A[a], self.lora_B[a], self.scaling[a],
                                     self.lora_dropout[a]) for a in adapters], slots)

    def one():
        lora_a, lora_b, dropout = _parts(self, adapter)
        args = (x, _base_of(self), lora_a, lora_b, self.scaling[adapter], dropout)
        if is_dora(self, adapter):
            return fused_dora_forward(*args, self.lora_magnitude_vector[adapter].weight)
        return fused_lora_forward(*args)
    if tracker is None or torch.compiler.is_compiling():
        return one()
    return tracker.call(self, x, one, _run_group)


def _run_group(members: tuple, x: torch.Tensor) -> Optional[list]:
    """The outputs of a formed group's layers for x in one fused op, or None when one of them
    cannot take the fused path now (its own call then says why)."""
    layers = []
    for layer in members:
        adapter, reason = _serving_plan(layer)
        if reason is not None or is_dora(layer, adapter):
            return None
        layers.append((_base_of(layer), layer.lora_A[adapter], layer.lora_B[adapter],
                       layer.scaling[adapter], layer.lora_dropout[adapter]))
    return fused_group_forward(x, layers)


def _group_fits(run: tuple) -> bool:
    """Whether a learned run of layers can form a fused group (fastlora/launch/group.py)."""
    from .launch.group import group_problem

    ranks = []
    for layer in run:
        adapter, reason = _serving_plan(layer)
        if reason is not None or is_dora(layer, adapter):  # DoRA layers run one by one
            return False
        ranks.append(layer.lora_A[adapter].weight.shape[0])
    return group_problem(ranks) is None


class _FusedForward:
    """What `patch` installs as a layer's `forward`: `_fused_forward` bound to the layer (and
    to its parent's GroupTracker, or None).

    Not a types.MethodType: pickle stores a bound method as getattr(layer, "_fused_forward"),
    which the layer does not have, so torch.load of a patched model failed. This pickles as
    _FusedForward(layer, tracker) (the layer itself is pickled once, cycles included), and
    deepcopy rebinds it to the copied layer the same way."""

    __slots__ = ("layer", "tracker")

    def __init__(self, layer: nn.Module, tracker: Optional[GroupTracker] = None):
        self.layer = layer
        self.tracker = tracker

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _fused_forward(self.layer, x, *args, tracker=self.tracker, **kwargs)

    def __reduce__(self):
        return _FusedForward, (self.layer, self.tracker)

    def __repr__(self) -> str:
        return f"<fastlora fused forward of {type(self.layer).__name__}>"


def _is_patched(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, _FusedForward) and forward.layer is module


def _lora_4bit_class():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # PEFT without bitsandbytes support: no such layer can exist
        return None
    return Linear4bit


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _remove_group_hooks(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, GroupHook):
            del model._forward_pre_hooks[key]


def patch(model: nn.Module, group: bool = True) -> PatchReport:
    """Send every servable PEFT LoRA layer over a bitsandbytes 4-bit base in `model` through
    the fused op (fastlora.lora_linear_4bit); returns a PatchReport.

    group: also run layers that read one input (q/k/v, gate/up) as one fused group op
    (fastlora.lora_group_4bit), found at run time among the patched layers that share a parent
    module (fastlora/grouping.py); False: every layer runs its own op.

    Idempotent: patching again re-examines every layer (a patched layer that can no longer be
    served, e.g. merged since, gets PEFT's forward back and is reported) and learns the groups
    afresh. Nothing is copied or re-registered; a model without such layers gives a report with
    zero patched."""
    _check_model(model)
    if not isinstance(group, bool):
        raise TypeError(f"group must be a bool, got {type(group).__name__}")
    report = PatchReport()
    lora_4bit = _lora_4bit_class()
    found = 0
    served: dict = {}  # parent module -> its served layers
    for name, module in model.named_modules():
        if lora_4bit is None or not isinstance(module, lora_4bit):
            continue
        found += 1
        reason = _patch_reason(module)
        if reason is None:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            served.setdefault(parent, []).append(module)
            report.patched += 1
        else:
            if _is_patched(module):
                del module.forward
            report.skipped.setdefault(reason, []).append(name)
    _remove_group_hooks(model)
    for layers in served.values():
        tracker = GroupTracker() if group and len(layers) >= 2 else None
        if tracker is not None:
            report.trackers.append(tracker)
        for layer in layers:
            if _is_patched(layer):
                layer.forward.tracker = tracker  # the same forward object, a fresh tracker
            else:
                layer.forward = _FusedForward(layer, tracker)
    if report.trackers:
        model.register_forward_pre_hook(GroupHook(report.trackers, _group_fits))
    if not found:
        logger.warning("fastlora.patch: no PEFT LoRA layer over a bitsandbytes 4-bit base in "
                       "this %s; nothing patched", type(model).__name__)
        return report
    logger.info("fastlora.patch: %d of %d LoRA 4-bit layers fused", report.patched, found)
    for reason, names in report.skipped.items():
        logger.warning("fastlora.patch: %d layer(s) keep PEFT's forward: %s (first: %s)",
                       len(names), reason, names[0])
    return report


def unpatch(model: nn.Module) -> int:
    """Give every patched layer in `model` its original forward back; returns how many.
    A no-op (returning 0) on a model that is not patched. When it restores a layer it also
    frees the dequantize + cuBLAS path's shared weight buffer (fastlora.release_dequant_buffer;
    any other patched model allocates it again on its next call)."""
    _check_model(model)
    _remove_group_hooks(model)
    restored = 0
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            restored += 1
    if restored:
        logger.info("fastlora.unpatch: %d layer(s) restored", restored)
        from .launch.buffer import release_dequant_buffer

        release_dequant_buffer()  # the dequantize + cuBLAS path's shared weight buffer
    return restored


# ----------------------------------------------------------------------------- several adapters

class _RouteHook:
    """Forward pre-hook (with kwargs) that hands a LoRA layer the batch's adapter_names, as
    PEFT's own `_enable_peft_forward_hooks` does at inference."""

    def __init__(self, names: list):
        self.names = names

    def __call__(self, module, args, kwargs):
        kwargs["adapter_names"] = self.names
        return args, kwargs


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names):
    """Route each sample of the batches run inside the block to its own LoRA adapter, in
    training too (beyond PEFT's API: PEFT takes `adapter_names=` at inference only):

        model.base_model.set_adapter(["a", "b", "c"])   # all three trainable
        with fastlora.adapter_batch(model, ["a", "b", "a", "__base__"]):
            loss = model(**batch).loss                  # one name per sample
            loss.backward()
        optimizer.step()                                # one optimizer over every adapter

    Every LoRA layer gets `adapter_names` as PEFT's mixed-batch forward takes it ("__base__":
    no adapter; a name a layer lacks: no adapter there). Layers fastlora.patch serves run the
    fused mixed-batch op (fastlora.mixed_linear_4bit: one base GEMM per layer, each row's LoRA
    term from its own adapter, every adapter's gradients those of its own samples); any other
    LoRA layer runs PEFT's own mixed-batch forward. Each adapter keeps its own rank, scaling
    and dropout. Run the backward inside the block too: gradient checkpointing recomputes
    the forward during backward and must see the same routing.

    ValueError for a name that is no adapter of the model or not a string; PEFT's own checks
    (one name per sample, no merged adapters, no DoRA) apply at each layer."""
    _check_model(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names (one per sample), got "
                        f"{type(adapter_names).__name__}")
    from peft.tuners.lora import LoraLayer
    try:  # PEFT also routes modules_to_save copies by adapter_names
        from peft.utils.other import AuxiliaryTrainingWrapper as _Wrapper
    except ImportError:  # older PEFT
        from peft.utils.other import ModulesToSaveWrapper as _Wrapper

    layers = [m for m in model.modules() if isinstance(m, (LoraLayer, _Wrapper))]
    known = {name for layer in layers if isinstance(layer, LoraLayer)
             for name in (*layer.lora_A, *layer.lora_embedding_A)}
    for name in adapter_names:
        if not isinstance(name, str):
            raise TypeError(f"adapter_names must hold strings, got {name!r}")
    unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
    if unknown:
        raise ValueError(f"adapter_names names {unknown}, which are no adapters of this model "
                         f"(its adapters: {sorted(known)}; '__base__' for none)")
    hook = _RouteHook(list(adapter_names))
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
