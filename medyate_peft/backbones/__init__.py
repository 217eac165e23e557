"""Pretrained backbones: the MCU int8 networks, EfficientNet-Lite0, all-MiniLM-L6-v2 (offline), and the
papers' fp32 mcunet-zoo networks (architecture offline, ImageNet weights from the zoo).

timm and transformers are imported only when a loader runs.
"""

from .efficientnet_lite import load_efficientnet_lite0
from .mcu import MCU_MODELS, load_mcu_model, mcu_transform
from .mcunet_zoo import ZOO_NETS, load_zoo_model, zoo_transform
from .minilm import load_minilm

__all__ = ["MCU_MODELS", "ZOO_NETS", "load_efficientnet_lite0", "load_mcu_model", "load_minilm", "load_zoo_model",
           "mcu_transform", "zoo_transform"]
