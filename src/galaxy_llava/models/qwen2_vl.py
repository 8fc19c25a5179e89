"""The Qwen2-VL family (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
a ViT that sees images at their own resolution as a grid of 14 px patches, a merger (the
projector, inside ``model.visual``) that joins 2x2 patches into one token, and a Qwen2 decoder
with multimodal rotary positions. The number of image tokens follows from ``image_grid_thw``;
the prompt is the processor's chat template; an answer ends with ``<|im_end|>``.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

from galaxy_llava.config import DEFAULT_QUESTION
from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json
from galaxy_llava.models.base import ModelFamily, capture_input, chat_prompt, unwrap
from galaxy_llava.models.llava import LANGUAGE_TARGETS

IMAGE_TOKEN = "<|image_pad|>"
END_OF_TURN = "<|im_end|>"
MERGER_TARGETS = r".*visual\.merger\.mlp\.[02]"
# The image processor's settings a video processor shares (frames are resized, normalised and
# cut into patches as images are; the patch geometry must be the model's).
_VIDEO_SHARED = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale",
                 "rescale_factor", "do_normalize", "image_mean", "image_std", "min_pixels",
                 "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
# For the model card: loading a saved folder's processor without torchvision.
WITHOUT_TORCHVISION = (
    "Plain `AutoProcessor.from_pretrained` builds Qwen2-VL's processor with its video "
    "processor, which needs torchvision (`pip install torchvision`, the build that matches "
    "your torch). Without it, build the inputs from the tokenizer and the image processor; "
    "this gives the processor's ids exactly:",
    """from transformers import AutoImageProcessor, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(MODEL)  # its chat template writes the prompt
image_processor = AutoImageProcessor.from_pretrained(MODEL)
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
pixels = image_processor(images=[image], return_tensors="pt")
n = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size**2
inputs = tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
inputs = {**inputs, **pixels, "mm_token_type_ids": (inputs["input_ids"] == image_id).int()}""")


def image_only_processor_class():
    """``Qwen2VLProcessor`` without its video processor: transformers 5.x builds the processor
    only with one, which needs torchvision; images alone need neither. Saved under the library's
    own class name, so machines with torchvision load it with plain ``AutoProcessor``."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    return ImageOnlyQwen2VLProcessor


class Qwen2VLFamily(ModelFamily):
    """Qwen2-VL and Qwen2.5-VL: variable image-token counts, the merger as connector."""

    name = "qwen2_vl"
    title = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    image_input_names = ("pixel_values", "image_grid_thw")
    image_placeholder = IMAGE_TOKEN
    answer_separator = ""  # the prompt ends with "assistant\n": the answer starts a new line

    def default_prompt(self, processor, question: str = DEFAULT_QUESTION) -> str:
        return chat_prompt(processor, question, "Qwen2-VL")

    def load_processor(self, source: str, trust_remote_code: bool = False):
        """``AutoProcessor`` where it can build the processor; without torchvision it returns
        only the tokenizer, so the image-only processor is assembled from the saved parts."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
            if hasattr(processor, "image_processor"):
                return processor
        except (OSError, ImportError, ValueError):  # no torchvision for the video processor
            pass
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(source)
        return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=tokenizer.chat_template)

    # Qwen/Qwen2-VL-*: the decoder under model., the ViT and merger under visual.
    checkpoint_keys = r"(model\.(?!language_model\.|visual\.)|visual\.|lm_head\.)"
    card_notes = (WITHOUT_TORCHVISION,)

    def save_processor(self, processor, folder) -> None:
        """The published files, ``video_preprocessor_config.json`` included (Qwen2-VL's Hub
        checkpoints carry it; transformers 5 and vLLM refuse a folder without it): the video
        processor's own where there is one, else written from the image processor's settings
        (no torchvision, no video processor object)."""
        super().save_processor(processor, folder)
        if getattr(processor, "video_processor", None) is None:
            image = processor.image_processor.to_dict()
            write_json(Path(folder) / "video_preprocessor_config.json", {
                **{k: image[k] for k in _VIDEO_SHARED if image.get(k) is not None},
                "video_processor_type": "Qwen2VLVideoProcessor",
                "processor_class": "Qwen2VLProcessor"})

    def num_image_tokens(self, processor, image_inputs: dict) -> int:
        merge = processor.image_processor.merge_size
        return int(image_inputs["image_grid_thw"][0].prod()) // merge**2

    def prompt_ids(self, processor, prompt: str, num_image_tokens: int) -> list[int]:
        tokenizer = processor.tokenizer
        if prompt.count(IMAGE_TOKEN) != 1:
            raise UserError(f"the prompt must contain {IMAGE_TOKEN} exactly once: {prompt!r}")
        ids = tokenizer(prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens),
                        add_special_tokens=False).input_ids
        if ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) != num_image_tokens:
            raise UserError(f"the tokenizer does not keep {IMAGE_TOKEN} as one token")
        return list(ids)

    def answer_ids(self, tokenizer, caption: str) -> list[int]:
        # The chat template ends the prompt with "assistant\n": the answer starts a new line.
        return list(tokenizer(caption.strip(), add_special_tokens=False).input_ids)

    def end_ids(self, tokenizer) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(END_OF_TURN)]

    def token_inputs(self, input_ids, processor) -> dict:
        """``mm_token_type_ids`` (1 at image tokens): the multimodal rotary positions need it."""
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return {"mm_token_type_ids": (input_ids == image_id).int()}

    def prefix_positions(self, model, input_ids, attention_mask, inputs: dict):
        """The multimodal rotary positions (temporal, height, width) of the library's own
        ``get_rope_index``; text after the image continues from the largest position + 1, the
        same in all three sections, which is where a caption's tokens go."""
        positions, deltas = unwrap(model).model.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=attention_mask)
        return positions, attention_mask.sum(-1) + deltas.view(-1).to(attention_mask.device)

    def continuation_positions(self, following, offsets):
        return (following[:, None] + offsets[None, :]).expand(3, -1, -1)

    def vision_encoder(self, model):
        return unwrap(model).model.visual

    def encoder_parameters(self, model):
        # The merger lives inside `visual` but is the connector: it trains.
        return (p for n, p in self.vision_encoder(model).named_parameters()
                if not n.startswith("merger."))

    language_lora_targets = LANGUAGE_TARGETS
    connector_lora_targets = MERGER_TARGETS

    def projector_module_names(self) -> list[str]:
        return ["merger"]

    def fsdp_wrap_classes(self, model) -> list[str]:
        inner = unwrap(model).model
        return [type(inner.language_model.layers[0]).__name__, type(inner.visual.blocks[0]).__name__]

    def unquantized_modules(self) -> list[str]:
        return ["visual", "lm_head"]

    def vision_features(self, model, image_inputs: dict):
        """The ViT's patch states before the merger, [all patches, width], captured by a
        pre-hook on the merger during the library's own ``get_image_features``."""
        inner = unwrap(model).model
        return capture_input(inner.visual.merger, lambda: inner.get_image_features(
            pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"]))

    def split_features(self, features, image_inputs: dict) -> list:
        return list(features.split(image_inputs["image_grid_thw"].prod(-1).tolist(), dim=0))

    @contextlib.contextmanager
    def cached_features(self, model):
        """``get_image_features`` replaced (on this instance) by the merger applied to cached
        patch states: the library's forward and generate splice them in as fresh ones."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inner = unwrap(model).model

        def from_cached(self, pixel_values, image_grid_thw=None, **_kwargs):
            merger = self.visual.merger
            merged = merger(pixel_values.to(next(merger.parameters()).dtype))
            sizes = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
            return BaseModelOutputWithPooling(pooler_output=merged.split(sizes))

        inner.get_image_features = types.MethodType(from_cached, inner)
        try:
            yield model
        finally:
            del inner.get_image_features


class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's interface, but its ViT reorders patches into attention windows
    and back around the merger, so merger-only replay of cached states is not exact: it trains
    uncached (``cacheable = False``). Its multimodal rotary positions are Qwen2-VL's for
    images, so caption scoring's token tree uses the same position hooks."""

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    cacheable = False


QWEN2_VL = Qwen2VLFamily()
QWEN2_5_VL = Qwen25VLFamily()
