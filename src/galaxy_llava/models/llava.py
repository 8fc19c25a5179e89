"""The LLaVA family (``LlavaForConditionalGeneration``: TinyLLaVA, llava-1.5): a CLIP tower, a
two-layer MLP projector (``multi_modal_projector``) and a Llama-style decoder; every ``<image>``
is expanded to a fixed number of image tokens (patches, CLS dropped by the "default" strategy).
"""

from __future__ import annotations

import contextlib
import types

from galaxy_llava.config import DEFAULT_QUESTION
from galaxy_llava.errors import UserError
from galaxy_llava.models.base import ModelFamily, capture_input, unwrap

# LoRA targets: the decoder's attention and MLP projections and the projector's two linears. A
# regex (peft full-matches it against module names) so the CLIP tower's q/k/v_proj never match.
LANGUAGE_TARGETS = (r".*language_model\.layers\.\d+\."
                    r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
PROJECTOR_TARGETS = r".*multi_modal_projector\.linear_[12]"


def _first(v):
    return v if isinstance(v, int) else v[0]  # sizes may be (h, w) pairs


def processor_image_tokens(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image to: patches, plus CLS unless
    the strategy drops it."""
    ip = processor.image_processor
    crop = (getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", True) else None) or {}
    size = getattr(ip, "size", None) or {}
    height = crop.get("height") or size.get("height") or size.get("shortest_edge")
    width = crop.get("width") or size.get("width") or size.get("shortest_edge")
    patch = processor.patch_size
    if patch is None or height is None:
        raise UserError("the processor has no patch_size or image size; load it with load_model()")
    n = (height // patch) * (width // patch) + (processor.num_additional_image_tokens or 0)
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


class LlavaFamily(ModelFamily):
    """LLaVA: fixed image-token count, CLIP tower, MLP projector."""

    name = "llava"
    title = "LLaVA"
    model_types = ("llava",)

    def default_prompt(self, processor, question: str = DEFAULT_QUESTION) -> str:
        return f"USER: <image>\n{question}\nASSISTANT:"  # TinyLLaVA's format (config.DEFAULT_PROMPT)

    def image_token_count(self, config) -> int:
        """Image tokens per image the language model sees (from the model config)."""
        vc = config.vision_config
        n = (_first(vc.image_size) // _first(vc.patch_size)) ** 2
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def fix_processor(self, processor, config) -> None:
        """TinyLLaVA's processor ships without ``patch_size`` (the notebook set it by hand): take
        it from the vision config, and the CLS/strategy accounting from the model config."""
        vc = config.vision_config
        if getattr(processor, "patch_size", None) is None:
            processor.patch_size = _first(vc.patch_size)
        expected = self.image_token_count(config)
        if processor_image_tokens(processor) != expected:
            processor.num_additional_image_tokens = 1
            processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        if processor_image_tokens(processor) != expected:
            raise UserError(f"the processor gives {processor_image_tokens(processor)} image tokens "
                            f"per image but the model expects {expected}; check the image "
                            "processor's crop size")

    def num_image_tokens(self, processor, image_inputs: dict) -> int:
        return processor_image_tokens(processor)  # every image is resized to one size

    def prompt_ids(self, processor, prompt: str, num_image_tokens: int) -> list[int]:
        tokenizer = processor.tokenizer
        image_token = getattr(tokenizer, "image_token", None) or "<image>"
        if prompt.count(image_token) != 1:
            raise UserError(f"the prompt must contain {image_token} exactly once: {prompt!r}")
        ids = tokenizer(prompt.replace(image_token, image_token * num_image_tokens),
                        add_special_tokens=True).input_ids
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if sum(i == image_id for i in ids) != num_image_tokens:
            raise UserError(f"the tokenizer does not keep {image_token} as one token")
        return list(ids)

    def vision_encoder(self, model):
        return unwrap(model).model.vision_tower

    # llava-hf/* and TinyLLaVA: the CLIP weights under vision_tower.vision_model.
    checkpoint_keys = (r"(language_model\.(model|lm_head)|multi_modal_projector"
                       r"|vision_tower\.vision_model)\.")
    language_lora_targets = LANGUAGE_TARGETS
    connector_lora_targets = PROJECTOR_TARGETS

    def projector_module_names(self) -> list[str]:
        return ["multi_modal_projector"]

    def fsdp_wrap_classes(self, model) -> list[str]:
        from torch import nn

        inner = unwrap(model).model
        names = []
        for part in (inner.language_model, inner.vision_tower):
            stack = next(m for m in part.modules() if isinstance(m, nn.ModuleList) and len(m))
            names.append(type(stack[0]).__name__)
        return names

    def unquantized_modules(self) -> list[str]:
        return ["vision_tower", "multi_modal_projector", "lm_head"]

    def vision_features(self, model, image_inputs: dict):
        """The projector's input (the selected CLIP layer, CLS dropped), see capture_input."""
        inner = unwrap(model).model
        return capture_input(inner.multi_modal_projector, lambda: inner.get_image_features(
            pixel_values=image_inputs["pixel_values"]))

    @contextlib.contextmanager
    def cached_features(self, model):
        """``LlavaModel.get_image_features`` replaced (on this instance only) by the projector
        applied to its input, so the library's forward splices cached encoder output exactly as
        it splices fresh output, and the projector runs inside the forward (DDP/FSDP see it)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inner = unwrap(model).model

        def from_cached(self, pixel_values, **_kwargs):
            projected = self.multi_modal_projector(pixel_values.to(
                self.multi_modal_projector.linear_1.weight.dtype))
            return BaseModelOutputWithPooling(pooler_output=list(projected))

        inner.get_image_features = types.MethodType(from_cached, inner)
        try:
            yield model
        finally:
            del inner.get_image_features


LLAVA = LlavaFamily()
