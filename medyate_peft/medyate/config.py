"""MeDyateConfig: what to train under which memory budget."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

from ..ranking import load_ranking
from ..strategies import DRAW_WEIGHTS, STRATEGIES, Strategy, get_strategy

# Bumped when the adapter file layout changes; loading a newer one fails with a clear message.
FORMAT_VERSION = 1
BYTES_PER_SLOT = (1, 2, 4, 8)  # int8, fp16/bf16, fp32, fp64 elements
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# Field kinds checked by `_check_kinds` (a field added to MeDyateConfig goes in one of these).
BOOL_FIELDS = ("freeze_bn_stats", "lean_backward", "detect_anomalies", "inference_mode", "lara_within_rgn",
               "rescale_norms", "use_shipped_ranking", "lean_recompute")
INT_FIELDS = ("bytes_per_slot", "seed", "ranking_batches")  # (resample_every, full_gradient_batches: below)
REAL_FIELDS = ("alpha_opt", "rgn_coverage", "max_activation_share")
OPTIONAL_FIELDS = ("max_activation_share",)  # None: the option is off
_HINTS = {"seed": " (the same on every DDP rank)", "bytes_per_slot": " (4 for fp32)"}


def _kind_error(name: str, value: Any, kind: str) -> TypeError:
    return TypeError(f"{name} must be {kind}{_HINTS.get(name, '')}, got {value!r} ({type(value).__name__})")


def _check_kinds(config: Any) -> None:
    """Booleans are booleans (the string "False" is truthy), ints are ints, reals are numbers; bools are
    neither ints nor reals here, though Python lets them pass as such."""
    for name in BOOL_FIELDS:
        if not isinstance(getattr(config, name), bool):
            raise _kind_error(name, getattr(config, name), "True or False")
    for name in INT_FIELDS:
        value = getattr(config, name)
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _kind_error(name, value, "an int")
        setattr(config, name, int(value))  # numpy ints too, as plain ints (JSON, torch.Generator)
    for name in REAL_FIELDS:
        value = getattr(config, name)
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _kind_error(name, value, "a number")


BIAS_OPTIONS = ("none", "all", "medyate_only")


@dataclass
class MeDyateConfig(PeftConfig):
    """Configuration of a MeDyate (or TraDy, or baseline-strategy) sparse adapter: a [`MeDyateModel`].

    Memory is counted as in the papers: per training sample, weight-gradient plus stored
    input-activation elements of the selected input channels, `bytes_per_slot` bytes each.

    Args:
        budget_kb (`float`, defaults to 256.0):
            Training memory budget in kB (KiB): weight gradients plus stored activations of the selected input
            channels, per training sample.
        bytes_per_slot (`int`, defaults to 4):
            Bytes per counted element (4 = fp32, as the papers).
        budget_scope (`str`, defaults to `"selection"`):
            What `budget_kb` bounds. `"selection"` (the papers' accounting): weight gradients and stored input
            activations of the selected channels. `"step"`: everything one training step holds per sample that
            grows with the method: also what back-propagation through the frozen layers keeps (masks,
            recomputation inputs, the head's input; measured on the first batch), the head's gradients and
            `optimizer_slots` of optimizer state per trained element. `memory_report` shows both.
        optimizer_slots (`int`, defaults to 0):
            Optimizer state tensors per trained element, charged under `budget_scope="step"`: 0 for plain SGD
            (the papers), 1 for SGD with momentum, 2 for Adam/AdamW.
        input_size (`Optional[List[int]]`):
            Shape of one input sample without the batch dim, e.g. `[3, 224, 224]` or `[128]` (tokens). With it,
            activation shapes are probed with a zero batch (in the model's dtype and device) at `get_peft_model`;
            `None` learns them from the first training batch.
        target_modules (`Optional[Union[List[str], str]]`):
            The candidate layers, by PEFT's rules: a string is a regex matched against the full module name, a
            list holds names or name suffixes. `None`: every supported `nn.Conv2d`, `nn.Linear` and transformers
            `Conv1D` outside `modules_to_save`.
        exclude_modules (`Optional[Union[List[str], str]]`):
            Layers never trained, by the same rules as `target_modules`.
        modules_to_save (`Optional[List[str]]`):
            Modules trained in full and saved with the adapter (the classifier). `None`: the model's head if one
            is found (timm's declared classifier, else `classifier`, `score`, `head` or `fc`).
        strategy (`str`, defaults to `"medyate"`):
            Channel-selection strategy, one of `medyate_peft.STRATEGIES` (MeDyate, TraDy and the papers'
            baselines and oracles).
        seed (`int`, defaults to 0):
            Seed of the channel draws; the same on every DDP rank.
        layer_ranking (`Optional[Union[str, dict]]`):
            LaRa/RGN layer ranking: a JSON path (read at once: the config keeps its content) or a dict from
            `medyate_peft.rank_layers`. `None` with a strategy that ranks layers: the shipped ranking of the
            architecture if there is one (`use_shipped_ranking`), else measured on the first training batches
            (`ranking_mode`).
        use_shipped_ranking (`bool`, defaults to `True`):
            With no `layer_ranking`, take the ranking that ships with medyate-peft for this architecture (the MCU
            nets, EfficientNet-Lite0, all-MiniLM-L6-v2; matched by layer names and weight shapes), if any.
        ranking_mode (`str`, defaults to `"budgeted"`):
            How the first training batches rank the layers when no ranking is given or shipped: `"budgeted"`
            measures a budget-sized slice of channels per batch through the channel-sparse backward, rotating
            through all of them, so no batch holds more than a training step; `"dense"` takes dense gradients of
            every layer (the memory of full fine-tuning). The oracles always measure dense gradients.
        ranking_batches (`int`, defaults to 3):
            Training batches that rank the layers (or seed an oracle) when no ranking is given; they train only
            the head. `"budgeted"`: at least this many, rounded up to whole rotations through the channels;
            `"dense"`: exactly this many.
        alpha_opt (`float`, defaults to 0.2):
            MeDyate's K rule: the smallest number K of top-ranked layers with budget / M_K <= alpha_opt.
        rgn_coverage (`float`, defaults to 0.97):
            TraDy's K rule: the share of the cumulative RGN the selected layers keep.
        lara_within_rgn (`bool`, defaults to `False`):
            [ours] LaRa-pool strategies: apply the alpha rule inside TraDy's RGN-coverage layer set only, which
            keeps the pool off the early layers whose channels are almost all stored activation.
        max_activation_share (`Optional[float]`):
            [ours] Ranked-pool strategies: skip layers (in ranking order) that would lift the pool's share of
            stored-activation slots above this, e.g. 0.5. `None`: the papers' rules.
        draw_weights (`str`, defaults to `"norm"`):
            Measured-norm draws (medyate, prev_medyate): `"norm"` (the papers: P ∝ N[c]) or `"norm_per_cost"`
            [ours] (P ∝ N[c] / cost(i, c)).
        rescale_norms (`bool`, defaults to `False`):
            [ours] Measured-norm draws: at each re-draw, bring the norms of channels measured earlier (and the
            exploration value) to the current scale (median growth of the re-measured channels).
        resample_every (`Optional[int]`):
            Re-draw every this many optimizer steps instead of at each epoch end (the papers' cadence, `None`).
            Honoured by MeDyateCallback and `medyate train`; plain loops use `medyate_peft.resample_due`.
        full_gradient_batches (`int`, defaults to 1):
            Batches summed into each full gradient taken from a closure (the oracles' resample,
            `plan(full_gradient=...)`): the closure is called this many times, each call the next batch's loss.
        bias (`str`, defaults to `"none"`):
            Biases trained in full, as LoRA's `bias`: `"none"`, `"all"`, or `"medyate_only"` (those of the wrapped
            layers). They are saved with the adapter and, like the head, not counted in the budget; disabling
            the adapter does not undo them (PEFT warns).
        freeze_bn_stats (`bool`, defaults to `True`):
            Keep BatchNorm running statistics frozen (outside `modules_to_save`) so the base model stays intact.
        lean_backward (`bool`, defaults to `True`):
            Save no activations for frozen layers on the backward path.
        lean_recompute (`bool`, defaults to `False`):
            With `lean_backward`, keep the smaller input of the frozen Conv2d/Linear below a smooth activation
            or gated MLP instead of the activation's input, and rerun that layer in backward; rerun attention
            modules that sit on a LayerNorm/RMSNorm from the norm's kept input (less memory, one extra forward
            of those layers; train decoders with `use_cache=False`).
        detect_anomalies (`bool`, defaults to `True`):
            Raise, naming the layer, on a NaN/inf gradient of a selected channel or trained value at resample.
            On the CPU the gradient check runs in that backward; on an accelerator its flag stays on the device
            and is read every 32 backwards and at resample (no host sync per step). Set it to `False` under fp16
            with a GradScaler, which skips such steps itself.
        init_weights (`bool`, defaults to `True`):
            `True`: the adapter starts as the identity (no channel changed). `False`: random non-zero deltas on
            about half of each layer's input channels, for tests (as PEFT's `init_lora_weights=False`).
        format_version (`int`):
            Version of the adapter file layout this config was written with; a newer one than this release
            understands is refused.
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
            "help": "LaRa/RGN ranking: a JSON path (read at once: the config keeps its content) or a dict from "
            "`medyate_peft.rank_layers`. None with a "
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
    lara_within_rgn: bool = field(
        default=False,
        metadata={
            "help": "[ours] LaRa-pool strategies: apply the alpha rule inside TraDy's RGN-coverage layer set only, "
            "which keeps the pool off the early layers whose channels are almost all stored activation."
        },
    )
    max_activation_share: float | None = field(
        default=None,
        metadata={
            "help": "[ours] Ranked-pool strategies: skip layers (in ranking order) that would lift the pool's share "
            "of stored-activation slots above this, e.g. 0.5. None: the papers' rules."
        },
    )
    draw_weights: str = field(
        default="norm",
        metadata={
            "help": "Measured-norm draws (medyate, prev_medyate): 'norm' (the papers: P ∝ N[c]) or 'norm_per_cost' "
            "[ours] (P ∝ N[c] / cost(i, c), which does not lean towards expensive early-layer channels)."
        },
    )
    rescale_norms: bool = field(
        default=False,
        metadata={
            "help": "[ours] Measured-norm draws: at each re-draw, bring the norms of channels measured earlier (and "
            "the exploration value) to the current scale (median growth of the re-measured channels)."
        },
    )
    resample_every: int | None = field(
        default=None,
        metadata={
            "help": "Re-draw every this many optimizer steps instead of at each epoch end (the papers' cadence, "
            "None): a 1-3 epoch fine-tune then still gets many draws. Honoured by MeDyateCallback and `medyate train`."
        },
    )
    full_gradient_batches: int = field(
        default=1,
        metadata={
            "help": "Batches summed into each full gradient taken from a closure (the oracles' resample, "
            "plan(full_gradient=...)): the closure is called this many times, each call the next batch's loss."
        },
    )
    bias: str = field(
        default="none",
        metadata={
            "help": "Biases trained in full, as LoRA's `bias`: 'none', 'all', or 'medyate_only' (those of the wrapped "
            "layers). They are saved with the adapter and, like the head, not counted in the budget."
        },
    )
    freeze_bn_stats: bool = field(
        default=True, metadata={"help": "Keep BatchNorm running statistics frozen so the base model stays intact."}
    )
    lean_backward: bool = field(
        default=True, metadata={"help": "Save no activations for frozen layers on the backward path."}
    )
    lean_recompute: bool = field(
        default=False,
        metadata={
            "help": "With lean_backward: keep a smooth activation's (GELU, SiLU, ...) smaller frozen Conv2d/Linear "
            "input instead of the activation's and re-run that layer in backward, and re-run attention modules "
            "from their norm's kept input: less memory, more compute (+23-37 % FLOPs on transformers)."
        },
    )
    detect_anomalies: bool = field(
        default=True,
        metadata={
            "help": "Raise, naming the layer, on a NaN/inf gradient of a selected channel (checked on the norms the "
            "sparse backward computes anyway) or trained value at resample. False under fp16 with a GradScaler, "
            "which skips such steps itself: their norms are then left out of the channel statistics."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as the identity (no channel changed). False: random non-zero deltas on "
            "about half of each layer's input channels, for tests (as PEFT's init_lora_weights=False)."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Adapter file format version."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MEDYATE
        # First: a newer file may hold values (a new strategy...) that this version would misreport.
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise _kind_error("format_version", self.format_version, f"an int (this version writes {FORMAT_VERSION})")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this adapter was written with format version {self.format_version}, newer than this "
                f"medyate-peft understands ({FORMAT_VERSION}); upgrade with `pip install -U medyate-peft`"
            )
        if isinstance(self.budget_kb, bool) or not isinstance(self.budget_kb, (int, float)):
            raise TypeError(f"budget_kb must be a number of kB, got {self.budget_kb!r}")
        if not math.isfinite(self.budget_kb) or self.budget_kb <= 0:
            raise ValueError(f"budget_kb must be a positive finite number of kB, got {self.budget_kb}")
        _check_kinds(self)
        if self.bytes_per_slot not in BYTES_PER_SLOT:
            raise ValueError(
                f"bytes_per_slot must be the size of one element: one of {BYTES_PER_SLOT} (4 for fp32), got "
                f"{self.bytes_per_slot}"
            )
        if not isinstance(self.strategy, str):
            raise _kind_error("strategy", self.strategy, "the name of a strategy")
        if self.budget_scope not in ("selection", "step"):
            raise ValueError(f"budget_scope must be 'selection' (the papers' accounting) or 'step', got "
                             f"{self.budget_scope!r}")
        if isinstance(self.optimizer_slots, bool) or not isinstance(self.optimizer_slots, int) or self.optimizer_slots < 0:
            raise ValueError(f"optimizer_slots must be an int >= 0 (0 SGD, 1 momentum, 2 Adam), got {self.optimizer_slots!r}")
        strategy = get_strategy(self.strategy)
        self._check_strategy_options(strategy)
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1] (what torch.Generator accepts), got {self.seed}")
        if not 0 < self.alpha_opt <= 1:
            raise ValueError(f"alpha_opt must be in (0, 1], got {self.alpha_opt}")
        if not 0 < self.rgn_coverage <= 1:
            raise ValueError(f"rgn_coverage must be in (0, 1], got {self.rgn_coverage}")
        if self.ranking_mode not in ("budgeted", "dense"):
            raise ValueError(f"ranking_mode must be 'budgeted' or 'dense', got {self.ranking_mode!r}")
        for name, optional in (("full_gradient_batches", False), ("resample_every", True)):
            value = getattr(self, name)
            if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {BIAS_OPTIONS} (which biases train in full), got {self.bias!r}")
        if self.ranking_batches < 1:
            raise ValueError(f"ranking_batches must be >= 1, got {self.ranking_batches}")
        if self.input_size is not None:
            if not isinstance(self.input_size, (list, tuple)):
                raise TypeError(
                    f"input_size must be the shape of one sample without the batch dim, as a list such as "
                    f"[3, 224, 224] or [128], got {self.input_size!r}"
                )
            if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in self.input_size):
                raise TypeError(f"input_size must hold whole sizes (ints), got {self.input_size!r}")
            self.input_size = [int(s) for s in self.input_size]
            if not self.input_size or min(self.input_size) <= 0:
                raise ValueError(f"input_size must be a non-empty list of positive sizes, got {self.input_size}")
        if isinstance(self.layer_ranking, (str, os.PathLike)) and os.path.isfile(self.layer_ranking):
            # by content: a path saved in adapter_config.json breaks on another machine or working directory
            self.layer_ranking = load_ranking(self.layer_ranking)
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(self.target_modules)

    def _check_strategy_options(self, strategy: Strategy) -> None:
        """Options that only some strategies use: set for another, they would silently do nothing."""
        if self.draw_weights not in DRAW_WEIGHTS:
            raise ValueError(f"draw_weights must be one of {DRAW_WEIGHTS}, got {self.draw_weights!r}")
        weighted = [n for n, s in STRATEGIES.items() if s.order == "weighted"]
        if (self.draw_weights != "norm" or self.rescale_norms) and strategy.order != "weighted":
            raise ValueError(
                f"draw_weights={self.draw_weights!r} / rescale_norms={self.rescale_norms} act on measured-norm draws, "
                f"which strategy {strategy.name!r} does not make; use them with strategy in {weighted}"
            )
        if self.lara_within_rgn and strategy.layers != "lara":
            lara = [n for n, s in STRATEGIES.items() if s.layers == "lara"]
            raise ValueError(
                f"lara_within_rgn applies the alpha rule, which strategy {strategy.name!r} does not use; use it "
                f"with strategy in {lara}"
            )
        if self.max_activation_share is not None:
            if strategy.layers == "all":
                raise ValueError(
                    f"max_activation_share caps a ranked layer pool, and strategy {strategy.name!r} pools every layer"
                )
            if not 0 < self.max_activation_share <= 1:
                raise ValueError(f"max_activation_share must be in (0, 1], got {self.max_activation_share}")
