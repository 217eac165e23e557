"""MeDyateConfig: what to train under which memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

from ..strategies import get_strategy

# Bumped when the adapter file layout changes; loading a newer one fails with a clear message.
FORMAT_VERSION = 1


@dataclass
class MeDyateConfig(PeftConfig):
    """Configuration of a MeDyate (or TraDy, or baseline-strategy) sparse adapter.

    Memory is counted as in the papers: per training sample, weight-gradient plus stored
    input-activation elements of the selected input channels, `bytes_per_slot` bytes each.
    """

    budget_kb: float = field(default=256.0, metadata={"help": "Training memory budget in kB (KiB)."})
    bytes_per_slot: int = field(default=4, metadata={"help": "Bytes per counted element (4 = fp32, as the papers)."})
    budget_scope: str = field(
        default="selection",
        metadata={
            "help": "What budget_kb bounds. 'selection' (the papers' accounting): weight gradients and stored "
            "input activations of the selected channels. 'step': everything one training step holds that grows "
            "with the method, per sample: also what back-propagation through the frozen layers keeps (masks, "
            "recomputation inputs, the head's input, measured on the first batch), the head's gradients and "
            "optimizer_slots of optimizer state per trained element. memory_report shows both."
        },
    )
    optimizer_slots: int = field(
        default=0,
        metadata={
            "help": "Optimizer state tensors per trained element, charged under budget_scope='step': 0 plain SGD "
            "(the papers), 1 SGD with momentum, 2 Adam/AdamW."
        },
    )
    input_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Shape of one input sample without the batch dim, e.g. [3, 224, 224] or [128] (tokens). "
            "None: activation shapes are learned from the first training batch."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Candidate layers (names or regex). None: every Conv2d/Linear."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Layers never trained."})
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved (the classifier). None: the model's head if found."},
    )
    strategy: str = field(default="medyate", metadata={"help": "Channel-selection strategy (see STRATEGIES)."})
    seed: int = field(default=0, metadata={"help": "Seed of the channel draws (identical on every DDP rank)."})
    layer_ranking: str | dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "LaRa/RGN ranking: a JSON path or dict from `medyate_peft.rank_layers`. None with a "
            "ranking strategy: computed from the first `ranking_batches` training batches (dense backward)."
        },
    )
    use_shipped_ranking: bool = field(
        default=True,
        metadata={
            "help": "With no layer_ranking, take the ranking that ships with medyate-peft for this architecture "
            "(MCU nets, EfficientNet-Lite0, all-MiniLM-L6-v2; matched by layer names and weight shapes) if any."
        },
    )
    ranking_mode: str = field(
        default="budgeted",
        metadata={
            "help": "How the first training batches rank the layers when no layer_ranking is given (and none "
            "ships for the architecture): 'budgeted' measures a budget-sized slice of channels per batch "
            "through the channel-sparse backward, rotating through all of them, so no batch holds more than "
            "a training step; 'dense' takes dense gradients of every layer (the memory of full fine-tuning). "
            "The oracle strategies (det_rgn, static_det_rgn, prob_raw) always measure dense gradients."
        },
    )
    ranking_batches: int = field(
        default=3,
        metadata={
            "help": "Training batches that rank the layers (or seed an oracle) when no layer_ranking is given; "
            "they train only the head. 'budgeted': at least this many, rounded up to whole rotations through "
            "the channels (each channel is measured once per rotation); 'dense': exactly this many."
        },
    )
    alpha_opt: float = field(default=0.2, metadata={"help": "MeDyate's K rule: smallest K with B / M_K <= alpha_opt."})
    rgn_coverage: float = field(default=0.97, metadata={"help": "TraDy's K rule: share of cumulative RGN kept."})
    freeze_bn_stats: bool = field(
        default=True, metadata={"help": "Keep BatchNorm running statistics frozen so the base model stays intact."}
    )
    lean_backward: bool = field(
        default=True, metadata={"help": "Save no activations for frozen layers on the backward path."}
    )
    detect_anomalies: bool = field(
        default=True,
        metadata={
            "help": "Raise, naming the layer, on a NaN/inf gradient of a selected channel (checked on the norms the "
            "sparse backward computes anyway) or trained value at resample. False under fp16 with a GradScaler, "
            "which skips such steps itself: their norms are then left out of the channel statistics."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Adapter file format version."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MEDYATE
        # First: a newer file may hold values (a new strategy...) that this version would misreport.
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this adapter was written with format version {self.format_version}, newer than this "
                f"medyate-peft understands ({FORMAT_VERSION}); upgrade with `pip install -U medyate-peft`"
            )
        if isinstance(self.budget_kb, bool) or not isinstance(self.budget_kb, (int, float)):
            raise TypeError(f"budget_kb must be a number of kB, got {self.budget_kb!r}")
        if not math.isfinite(self.budget_kb) or self.budget_kb <= 0:
            raise ValueError(f"budget_kb must be a positive finite number of kB, got {self.budget_kb}")
        if self.budget_scope not in ("selection", "step"):
            raise ValueError(f"budget_scope must be 'selection' (the papers' accounting) or 'step', got "
                             f"{self.budget_scope!r}")
        if isinstance(self.optimizer_slots, bool) or not isinstance(self.optimizer_slots, int) or self.optimizer_slots < 0:
            raise ValueError(f"optimizer_slots must be an int >= 0 (0 SGD, 1 momentum, 2 Adam), got {self.optimizer_slots!r}")
        if self.bytes_per_slot <= 0:
            raise ValueError(f"bytes_per_slot must be positive (4 for fp32), got {self.bytes_per_slot}")
        get_strategy(self.strategy)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int (the same on every DDP rank), got {self.seed!r}")
        if not 0 < self.alpha_opt <= 1:
            raise ValueError(f"alpha_opt must be in (0, 1], got {self.alpha_opt}")
        if not 0 < self.rgn_coverage <= 1:
            raise ValueError(f"rgn_coverage must be in (0, 1], got {self.rgn_coverage}")
        if self.ranking_mode not in ("budgeted", "dense"):
            raise ValueError(f"ranking_mode must be 'budgeted' or 'dense', got {self.ranking_mode!r}")
        if self.ranking_batches < 1:
            raise ValueError(f"ranking_batches must be >= 1, got {self.ranking_batches}")
        if self.input_size is not None:
            if not isinstance(self.input_size, (list, tuple)):
                raise TypeError(
                    f"input_size must be the shape of one sample without the batch dim, as a list such as "
                    f"[3, 224, 224] or [128], got {self.input_size!r}"
                )
            self.input_size = [int(s) for s in self.input_size]
            if not self.input_size or min(self.input_size) <= 0:
                raise ValueError(f"input_size must be a non-empty list of positive sizes, got {self.input_size}")
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(self.target_modules)
