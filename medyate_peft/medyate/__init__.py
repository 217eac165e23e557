from .config import MeDyateConfig
from .layer import Conv2d, Linear, MeDyateLayer
from .model import MeDyateModel

__all__ = ["Conv2d", "Linear", "MeDyateConfig", "MeDyateLayer", "MeDyateModel"]
