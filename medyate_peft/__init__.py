"""medyate-peft: memory-budgeted dynamic sparse fine-tuning (MeDyate, TraDy) as a PEFT method.

`import medyate_peft` registers the method with PEFT, so `get_peft_model(model, MeDyateConfig(...))`
and `PeftModel.from_pretrained(base, path)` work like any built-in PEFT method.
"""

from ._registration import register

register()

from .callbacks import MeDyateCallback  # noqa: E402
from .medyate import MeDyateConfig, MeDyateLayer, MeDyateModel  # noqa: E402
from .ranking import load_ranking, rank_layers, save_ranking  # noqa: E402
from .strategies import STRATEGIES, resample_due  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "STRATEGIES",
    "MeDyateCallback",
    "MeDyateConfig",
    "MeDyateLayer",
    "MeDyateModel",
    "__version__",
    "load_ranking",
    "rank_layers",
    "resample_due",
    "save_ranking",
]
