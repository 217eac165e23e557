"""The epoch boundary: where the trained channels are folded in and the next ones drawn.

MeDyate re-draws its channels once per epoch with `resample(optimizer)`. Pass the optimizer: the
flat trainable vector's slots now belong to other channels, so their optimizer state (momentum,
Adam moments) is dropped. The papers' recipe is plain SGD without momentum, which has none.

transformers Trainer::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[MeDyateCallback()])

Every Trainer checkpoint then also holds `medyate_training_state.pt` (selection, measured channel
norms, sampler RNG, live values), and `trainer.train(resume_from_checkpoint=...)` continues exactly
where the interrupted run was.

Plain PyTorch loop (a PeftModel forwards `resample` to its MeDyate tuner)::

    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.resample(optimizer)

Accelerate (also DDP: every rank calls it, and all ranks draw the same channels)::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for epoch in range(epochs):
        for batch in loader:
            ...
        accelerator.unwrap_model(model).resample(optimizer)

Re-drawing every N optimizer steps instead of every epoch (`MeDyateConfig(resample_every=N)`: a
1-3 epoch fine-tune then still gets many draws; the callback and `medyate train` honour it). In a
plain loop, count the steps yourself::

    step = 0
    for epoch in range(epochs):
        for x, y in loader:
            ...
            optimizer.step()
            step += 1
            if medyate_peft.resample_due(config.resample_every, step):
                model.resample(optimizer)
        if medyate_peft.resample_due(config.resample_every):  # at epoch ends, with resample_every=None
            model.resample(optimizer)

The dynamic oracles (det_rgn, lara_det_raw, prob_raw) also need a full gradient at each boundary,
called `full_gradient_batches` times, each call the loss of the next batch::

    batches = iter(loader)
    model.resample(optimizer, full_gradient=lambda: loss_of(model, next(batches)))

Without a `layer_ranking` (and none shipped for the architecture), the first training batches rank
the layers and leave the channel vector unused, which plain DDP rejects: pass a ranking
(`rank_layers`) or wrap with `find_unused_parameters=True` (Accelerate:
`DistributedDataParallelKwargs(find_unused_parameters=True)`).
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import atomic_save
from .medyate.model import MeDyateModel
from .ranking import output_loss
from .strategies import get_strategy, resample_due

ModelLoss = Callable[[nn.Module], torch.Tensor]
TRAINING_STATE_NAME = "medyate_training_state.pt"


def find_tuner(model: nn.Module) -> MeDyateModel:
    """The MeDyate tuner inside a PeftModel, possibly wrapped by DDP, DataParallel or torch.compile."""
    model = extract_model_from_parallel(model)
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, MeDyateModel):
            return candidate
    raise TypeError(f"{type(model).__name__} is not a MeDyate PEFT model (get_peft_model(..., MeDyateConfig(...)))")


def _batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    loss = output_loss(model(**batch)) if isinstance(batch, Mapping) else None
    if loss is None:
        raise ValueError(
            "an oracle strategy needs a full-gradient loss at each epoch end: the train batch gave no .loss, "
            "so pass MeDyateCallback(full_gradient=lambda model: loss)"
        )
    return loss


class MeDyateCallback(TrainerCallback):
    """Calls `resample(optimizer)` at the end of every Trainer epoch (or every `resample_every` steps).

    It also checkpoints the sampler. For the dynamic oracles, `full_gradient(model) -> loss` gives
    the extra dense steps (called `full_gradient_batches` times); by default the losses of the first
    batches of the Trainer's train dataloader (`model(**batch).loss`).
    A resumed run reads the sampler state from `<output_dir>/checkpoint-<step>`, the folder that
    `resume_from_checkpoint=True` picks; resuming from a folder elsewhere, name it in `resume_from`.
    """

    def __init__(self, full_gradient: ModelLoss | None = None, resume_from: str | os.PathLike | None = None) -> None:
        self.full_gradient = full_gradient
        self.resume_from = resume_from

    def on_save(self, args, state, control, model=None, **kwargs):
        """Beside the Trainer's adapter files, which hold folded deltas only: what exact resumption needs."""
        if state.is_world_process_zero:  # every rank holds the same sampler state
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            atomic_save(find_tuner(model).training_state_dict(), folder / TRAINING_STATE_NAME)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """When the Trainer resumes (global_step > 0), restore the sampler saved with that checkpoint.

        Under fp16 the Trainer's GradScaler skips the steps whose gradients overflow; those are
        expected, so the adapter's NaN/inf detection is turned off (as `medyate train` does).
        """
        tuner = find_tuner(model)
        if args.fp16:
            tuner.peft_config[tuner.active_adapters[0]].detect_anomalies = False
        if state.global_step == 0:
            return control
        folder = Path(self.resume_from or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = folder / TRAINING_STATE_NAME
        if not path.is_file():
            warnings.warn(
                f"MeDyateCallback: resuming at step {state.global_step} but {path} does not exist, so the channel "
                "sampler starts afresh (weights are restored by the Trainer, selection and measured norms are not). "
                "If the checkpoint is elsewhere, pass MeDyateCallback(resume_from=<checkpoint folder>).",
                stacklevel=2,
            )
            return control
        tuner.load_training_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        """With `resample_every`, re-draw every that many optimizer steps (once the channels are planned)."""
        tuner = find_tuner(model)
        adapter = tuner.active_adapters[0]
        if tuner.is_planned(adapter) and resample_due(tuner.peft_config[adapter].resample_every, state.global_step):
            self._resample(tuner, adapter, model, optimizer, train_dataloader)
        return control

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        tuner = find_tuner(model)
        adapter = tuner.active_adapters[0]
        if resample_due(tuner.peft_config[adapter].resample_every):
            self._resample(tuner, adapter, model, optimizer, train_dataloader)
        return control

    def _resample(self, tuner: MeDyateModel, adapter: str, model: nn.Module, optimizer, train_dataloader) -> None:
        closure = None
        config = tuner.peft_config[adapter]
        strategy = get_strategy(config.strategy)
        if strategy.needs_full_gradient and strategy.dynamic and tuner.is_planned(adapter):
            if self.full_gradient is not None:
                closure = lambda: self.full_gradient(model)  # noqa: E731
            else:  # the first full_gradient_batches batches of the train loader, one per call
                batches = itertools.cycle(itertools.islice(train_dataloader, config.full_gradient_batches))
                closure = lambda: _batch_loss(model, next(batches))  # noqa: E731
        tuner.resample(optimizer, adapter_name=adapter, full_gradient=closure)
