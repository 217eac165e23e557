from .config import MeDyateConfig
from .layer import Conv1D, Conv2d, Linear, MeDyateLayer
from .model import MeDyateModel

__all__ = ["Conv1D", "Conv2d", "Linear", "MeDyateConfig", "MeDyateLayer", "MeDyateModel"]
