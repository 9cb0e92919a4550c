"""`FastLoRACallback`: fastlora switched on in any transformers Trainer (TRL's SFTTrainer,
DPOTrainer, GRPOTrainer, ...) with one line.

TRL builds the PEFT model inside the trainer (from `peft_config`, after
`prepare_model_for_kbit_training`-style upcasts and with gradient checkpointing on by default),
so the model to patch exists only once the trainer does. The callback patches the trainer's
model when training begins (`on_train_begin`: after the trainer has wrapped it, before the
first step), logs the PatchReport once groups have formed (q/k/v and gate/up form as the second
forward starts, fastlora/grouping.py), and, with `unpatch_at_end=True`, gives the layers PEFT's
forward back when training ends. The plain form, `fastlora.patch(trainer.model)` before
`trainer.train()`, does the same without the logging.

    trainer = SFTTrainer(model=model_4bit, peft_config=LoraConfig(...), ...,
                         callbacks=[fastlora.FastLoRACallback()])
    trainer.train()
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from .peft_patch import PatchReport, patch, unpatch

logger = logging.getLogger("fastlora")


class FastLoRACallback(TrainerCallback):
    """Patch the trainer's model with fastlora.patch when training begins.

    group: as in fastlora.patch (layers that read one input run as one fused op).
    unpatch_at_end: restore PEFT's forward on every patched layer when training ends (default
        False: evaluation and generation after training keep the fused path).
    require_patched: raise if the model has no layer fastlora can fuse (default False: a
        warning, and training goes on through PEFT's forward).

    After training begins, `report` is the PatchReport (None before)."""

    def __init__(self, group: bool = True, unpatch_at_end: bool = False,
                 require_patched: bool = False):
        for name, value in (("group", group), ("unpatch_at_end", unpatch_at_end),
                            ("require_patched", require_patched)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.group = group
        self.unpatch_at_end = unpatch_at_end
        self.require_patched = require_patched
        self.report: Optional[PatchReport] = None
        self._model: Optional[nn.Module] = None
        self._logged = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError("FastLoRACallback: the trainer passed no model to on_train_begin "
                            f"(got {type(model).__name__}); use fastlora.patch(trainer.model) "
                            "before trainer.train() instead")
        self._model, self._logged = model, False
        self.report = patch(model, group=self.group)
        if not self.report.patched:
            skipped = "; ".join(f"{len(names)} x {reason}"
                                for reason, names in self.report.skipped.items())
            message = ("FastLoRACallback: no layer fused (" + (skipped or "the model has no "
                       "PEFT LoRA layer over a bitsandbytes 4-bit base") + "); training runs "
                       "through PEFT's forward")
            if self.require_patched:
                raise RuntimeError(message)
            logger.warning(message)
            self._logged = True
        elif not self.report.trackers:  # nothing left to form: the report is final now
            self._log(state)

    def on_step_end(self, args, state, control, **kwargs):
        # one optimizer step is at least one forward: groups have formed by the second's end
        if not self._logged and state.global_step >= 2:
            self._log(state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._logged and self.report is not None:
            self._log(state)
        if self.unpatch_at_end and self._model is not None:
            unpatch(self._model)
            self._model = None

    def _log(self, state) -> None:
        self._logged = True
        if state.is_world_process_zero:
            logger.info("%s", self.report)
