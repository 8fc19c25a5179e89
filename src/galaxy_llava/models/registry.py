"""The model families galaxy-llava supports, by ``model_type``; :func:`family_for` picks one.

Adding a family: a module beside ``llava.py`` implementing :class:`~.base.ModelFamily`, and one
entry here."""

from __future__ import annotations

from galaxy_llava.errors import UserError
from galaxy_llava.models.base import ModelFamily, unwrap
from galaxy_llava.models.idefics3 import IDEFICS3
from galaxy_llava.models.llava import LLAVA
from galaxy_llava.models.qwen2_vl import QWEN2_5_VL, QWEN2_VL

FAMILIES: dict[str, ModelFamily] = {
    model_type: family for family in (LLAVA, QWEN2_VL, QWEN2_5_VL, IDEFICS3)
    for model_type in family.model_types}


def family_for(config_or_model) -> ModelFamily:
    """The family of a model or config, from its ``model_type``; one line naming the supported
    types when there is none."""
    config = getattr(unwrap(config_or_model), "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"unsupported model type {model_type!r}; supported: "
                        f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
