"""Groups of patched LoRA layers that read one input, found at run time (issue 13).

`fastlora.patch` gives every parent module that holds two or more patched layers one
GroupTracker (attention: q/k/v/o; MLP: gate/up/down). The tracker learns which of its layers
are called one after another on the very same tensor (q, k and v on the hidden states; gate and
up on the MLP input; whatever else shares an input), and from the next model forward on runs
such a run as one fused group op (fastlora.lora_group_4bit): the first member's call computes
every member's output, each later member's call takes its own output, provided it is called
with that same tensor, unchanged since. Anything else is a break of the pattern:

  - a member called with another tensor, or after the tensor was modified in place;
  - a member not called, or called out of order, before the group's first member again;
  - a member that cannot take the fused path for that call (merged, adapters disabled, called
    with adapter_names or extra arguments, several active adapters, ...).

That call (and the rest of the group in that forward) runs per layer, with the same results;
the reason is logged once per process at WARNING; the tracker drops its groups at the next
model forward and learns again.

When things change. A tracker changes its groups only at the start of a model forward (the
forward pre-hook `patch` installs on the model it was given), never inside a backward pass, so
that gradient checkpointing's recomputation of a block makes the very choices the block's
original forward made (non-reentrant checkpointing checks that the recomputed saved tensors
match; per-layer and grouped ops save different ones). Under torch.compile every layer runs
per layer (the compiled graph sees the single-layer custom ops, as without grouping).
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import torch

logger = logging.getLogger("fastlora")

__all__ = ["GroupTracker", "GroupHook", "BREAKS"]

# why a formed group ran per layer (logged once each)
OTHER_INPUT = "a group member was called with another tensor than its first member"
MODIFIED = "the group's input was modified in place between its members' calls"
ORDER = "a group member was not called, or called out of order, after its first member"
UNSERVED = "a group member could not take the fused path for this call"
BREAKS = (OTHER_INPUT, MODIFIED, ORDER, UNSERVED)

_logged: set = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("fastlora: a fused q/k/v-style group ran per layer for this call (%s); "
                       "it is learned again from the next forward; logged once per reason",
                       reason)


def _version(x: torch.Tensor) -> Optional[int]:
    return None if x.is_inference() else x._version  # inference tensors keep no counter


def in_backward() -> bool:
    """Whether this thread is inside an autograd backward pass (checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class GroupTracker:
    """The patched layers under one parent module: what was learned, the groups formed, and the
    outputs a group's first member computed for the others (see the module doc).

    Pickled or deep-copied, it keeps its groups (as the copied layers) and drops every tensor."""

    def __init__(self, max_members: int = 4):
        self.max_members = max_members
        self.groups: list[tuple] = []
        self._leader: dict = {}  # first member -> its group
        self._member: dict = {}  # any member -> its group
        self.broken: Optional[str] = None
        self._transient()

    def _transient(self) -> None:
        self.cache: dict = {}  # member -> (x, version, y)
        self.observed: list[tuple] = []
        self.run: list = []
        self.run_x = None  # weakref to the run's tensor
        self.run_version = None

    def __getstate__(self):
        return {"max_members": self.max_members, "groups": self.groups}

    def __setstate__(self, state):
        self.__init__(state["max_members"])
        self._form(state["groups"])

    def _form(self, groups) -> None:
        self.groups = list(groups)
        self._leader = {g[0]: g for g in self.groups}
        self._member = {m: g for g in self.groups for m in g}

    # ------------------------------------------------------------------ learning

    def _close_run(self) -> None:
        if len(self.run) >= 2:
            self.observed.append(tuple(self.run))
        self.run, self.run_x, self.run_version = [], None, None

    def _learn(self, layer, x: torch.Tensor) -> None:
        same = (self.run_x is not None and self.run_x() is x
                and self.run_version == _version(x) and layer not in self.run
                and len(self.run) < self.max_members)
        if not same:
            self._close_run()
            self.run_x, self.run_version = weakref.ref(x), _version(x)
        self.run.append(layer)

    def new_forward(self, fits: Callable[[tuple], bool]) -> None:
        """At a model forward's start (outside backward): apply a break seen since the last
        one (drop the groups, learn again), else form the groups learned (runs of 2+ layers on
        one tensor, disjoint, each passing `fits`)."""
        self._close_run()
        if self.cache:  # a group's first member ran, a member never took its output
            self.broken = self.broken or ORDER
        if self.broken is not None:
            _log_once(self.broken)
            self._form([])
            self.broken = None
        elif self.observed:
            formed, seen = list(self.groups), set(self._member)
            for run in dict.fromkeys(self.observed):  # in order, without repeats
                if not seen.intersection(run) and fits(run):
                    formed.append(run)
                    seen.update(run)
            self._form(formed)
        self._transient()

    # ------------------------------------------------------------------ calls

    def unserved(self, layer) -> None:
        """`layer`'s call is not taking the fused path: a group's pattern breaks if it waited."""
        if self.cache.pop(layer, None) is not None:
            self.broken = self.broken or UNSERVED

    def call(self, layer, x: torch.Tensor, one: Callable[[], torch.Tensor],
             group: Callable[[tuple, torch.Tensor], Optional[list]]) -> torch.Tensor:
        """`layer`'s output for x: its share of a group's output, or the group run by its first
        member (group(members, x) -> outputs, or None when a member cannot be served now), or
        one() (the per-layer fused op), learning from the call."""
        entry = self.cache.pop(layer, None)
        if entry is not None:
            cached_x, version, y = entry
            if cached_x is x and version == _version(x):
                return y
            self.broken = self.broken or (MODIFIED if cached_x is x else OTHER_INPUT)
        members = self._leader.get(layer)
        if members is not None:
            if self.cache:  # outputs of the last group run were never taken
                self.broken = self.broken or ORDER
                self.cache.clear()
            ys = group(members, x)
            if ys is not None:
                version = _version(x)
                for member, y in zip(members[1:], ys[1:]):
                    self.cache[member] = (x, version, y)
                return ys[0]
            self.broken = self.broken or UNSERVED
        elif layer not in self._member:
            self._learn(layer, x)
        return one()

    def sizes(self) -> dict[int, int]:
        """{group size: how many groups of that size are formed}."""
        out: dict[int, int] = {}
        for g in self.groups:
            out[len(g)] = out.get(len(g), 0) + 1
        return dict(sorted(out.items()))


class GroupHook:
    """The forward pre-hook `patch` puts on the model: each model forward (outside backward,
    not while torch.compile traces) lets the model's trackers form or drop their groups."""

    def __init__(self, trackers: list, fits: Callable[[tuple], bool]):
        self.trackers = trackers
        self.fits = fits

    def __call__(self, module, args):
        if torch.compiler.is_compiling() or in_backward():
            return None
        for tracker in self.trackers:
            tracker.new_forward(self.fits)
        return None
