"""The model-family interface: what the product needs to know about one kind of vision-language
model (:mod:`.registry` picks the family of a checkpoint by its ``model_type``).

Everything family-specific (how many image tokens the processor expands ``<image>`` to, where the
vision encoder and the projector are, which modules LoRA adapts, how to capture the frozen
encoder's output and feed it back cached) lives behind :class:`ModelFamily`; training, description
and evaluation never name a family's modules. A new family is one new module and one registry entry.
"""

from __future__ import annotations

import contextlib
from typing import Any



class ModelFamily:
    """One family of image-text-to-text models (subclass per family; see ``models/llava.py``)."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    # --- tokens and prompt
    def image_token_count(self, config) -> int:
        """Image tokens per image the language model sees."""
        raise NotImplementedError

    def fix_processor(self, processor, config) -> None:
        """Make ``processor`` expand images to exactly the tokens the model expects."""

    def prompt_ids(self, processor, prompt: str) -> list[int]:
        """Token ids of ``prompt`` (BOS first) with its image placeholder expanded."""
        raise NotImplementedError

    def pixel_values(self, processor, images):
        """The image processor's pixel values: (3, H, W) for one image, (N, 3, H, W) for a list."""
        single = not isinstance(images, (list, tuple))
        out = processor.image_processor(images=[images] if single else list(images),
                                        return_tensors="pt")["pixel_values"]
        return out[0] if single else out

    # --- where things are
    def vision_encoder(self, model):
        """The frozen vision encoder module of a (possibly peft-wrapped) model."""
        raise NotImplementedError

    def lora_target_modules(self, projector: str) -> str:
        """peft ``target_modules`` regex: the language model's linears, plus the projector when
        ``projector == "lora"``; never the vision encoder."""
        raise NotImplementedError

    def projector_module_names(self) -> list[str]:
        """Names for peft ``modules_to_save`` when the projector trains whole."""
        raise NotImplementedError

    def fsdp_wrap_classes(self, model) -> list[str]:
        """Class names of the repeated blocks FSDP shards as units (decoder and encoder layers)."""
        raise NotImplementedError

    def unquantized_modules(self) -> list[str]:
        """Module names QLoRA keeps in full precision (encoder, projector, output head)."""
        raise NotImplementedError

    # --- the cached-encoder fast path
    def vision_features(self, model, pixel_values):
        """The frozen encoder's output for ``pixel_values``: exactly what the projector receives."""
        raise NotImplementedError

    def feature_shape(self, config) -> tuple[int, int]:
        """(tokens, width) of one image's :meth:`vision_features`."""
        raise NotImplementedError

    def cached_features(self, model) -> contextlib.AbstractContextManager:
        """While active, the model's ``pixel_values`` input carries :meth:`vision_features` rows
        instead of images (the encoder is skipped; the projector still runs inside forward)."""
        raise NotImplementedError


def unwrap(model) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
