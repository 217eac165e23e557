"""Registers MeDyate as a PEFT method (peft type MEDYATE) on `import medyate_peft`.

PEFT keys its registries by members of the `PeftType` enum, which has no public way to add one,
so the member is added the way `enum` itself stores members.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "MEDYATE"


def _add_peft_type() -> None:
    if NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, NAME)
    member._name_, member._value_ = NAME, NAME
    member.__objclass__ = PeftType
    member.__init__(NAME)
    type.__setattr__(PeftType, NAME, member)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .peft_patches import install

    _add_peft_type()
    install()  # atomic save_pretrained, clean failed loads (MeDyate adapters only)
    if PeftType.MEDYATE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    from .medyate import MeDyateConfig, MeDyateModel

    register_peft_method(name="medyate", config_cls=MeDyateConfig, model_cls=MeDyateModel, prefix="medyate_")
