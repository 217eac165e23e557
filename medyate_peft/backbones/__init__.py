"""Pretrained backbones that load offline: the MCU int8 networks, EfficientNet-Lite0, all-MiniLM-L6-v2.

timm and transformers are imported only when a loader runs.
"""

from .efficientnet_lite import load_efficientnet_lite0
from .mcu import MCU_MODELS, load_mcu_model, mcu_transform
from .minilm import load_minilm

__all__ = ["MCU_MODELS", "load_efficientnet_lite0", "load_mcu_model", "load_minilm", "mcu_transform"]
