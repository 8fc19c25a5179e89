"""The Idefics3 family (``Idefics3ForConditionalGeneration``: SmolVLM;
``SmolVLMForConditionalGeneration``: SmolVLM2): a SigLIP vision encoder (``model.vision_model``), a
connector (pixel shuffle + one linear, ``model.connector``) and a Llama decoder
(``model.text_model``). The image processor may split an image into tiles plus a global view
(sub-images); each sub-image gives ``image_seq_len`` image tokens, wrapped in
``<fake_token_around_image>`` and ``<global-img>`` / ``<row_i_col_j>`` tokens. The prompt is the
processor's chat template; an answer ends with ``<end_of_utterance>``.

Image inputs are ``pixel_values`` [1, sub-images, 3, H, W] and ``pixel_attention_mask``
[1, sub-images, H, W] per image. Two choices make them batch and cache alike:

* Every image is padded to the most sub-images the processor can give (1 with splitting off; the
  tile grid of a square image otherwise) with all-zero sub-images, which the model drops exactly
  as it drops the processor's own padding images. Images then concatenate along dim 0, and the
  feature cache holds one row shape.
* The tile grid (rows x columns) decides the prompt tokens, and the sub-image count alone does not
  tell 1x2 from 2x1. It rides in the attention mask's values: valid pixels hold ``1 + rows``
  (1, exactly the processor's mask, when the image is not split). The model only asks whether a
  patch has any valid pixel (``sum > 0``), so its output is unchanged; the tests check it.
"""

from __future__ import annotations

import contextlib
import math
import types

from galaxy_llava.config import DEFAULT_QUESTION
from galaxy_llava.errors import UserError
from galaxy_llava.models.base import ModelFamily, capture_input, chat_prompt, unwrap

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<end_of_utterance>"
# LoRA targets: the decoder's attention and MLP projections (the vision encoder's layers live under
# vision_model.encoder.layers and never match) and the connector's one linear.
TEXT_TARGETS = (r".*text_model\.layers\.\d+\."
                r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
CONNECTOR_TARGETS = r".*connector\.modality_projection\.proj"
_MAX_IMAGE_SIZE = 4096  # the image processors' absolute cap on the resized image


def image_only_smolvlm_processor_class():
    """``SmolVLMProcessor`` without its video processor and num2words (both only for videos;
    the video processor needs torchvision). Saved under the library's own class name, so
    machines with both load it with plain ``AutoProcessor``."""
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169,
                     chat_template=None, **kwargs):
            self.fake_image_token = getattr(tokenizer, "fake_image_token",
                                            "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", IMAGE_TOKEN)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", END_OF_TURN)
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLMProcessor's own reads the video processor's frame settings.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

        def to_dict(self):
            return {**super().to_dict(), "processor_class": "SmolVLMProcessor",
                    "image_seq_len": self.image_seq_len}

    return ImageOnlySmolVLMProcessor


def _longest_edge(size) -> int | None:
    size = dict(size or {})
    return size.get("longest_edge") or max(size.get("height") or 0, size.get("width") or 0) or None


def max_sub_images(processor) -> int | None:
    """The most sub-images the image processor gives one image: 1 without splitting, else the
    tile grid of a square image (whose longest edge is resized like every image's) plus the
    global view; None where images are not resized (no bound)."""
    ip = processor.image_processor
    if not getattr(ip, "do_image_splitting", False):
        return 1
    longest, tile = _longest_edge(getattr(ip, "size", None)), _longest_edge(ip.max_image_size)
    if not getattr(ip, "do_resize", True) or longest is None:
        return None
    per_side = math.ceil(min(longest, _MAX_IMAGE_SIZE) / tile)
    return per_side * per_side + 1 if per_side > 1 else 1


def _real_images(x, keep_one: bool):
    """Which of ``x``'s [N, ...] entries are real: not all zero, the rule of the library's
    ``get_image_features`` (SmolVLM keeps the first one when none is)."""
    real = x.flatten(1).ne(0).any(dim=1)
    if keep_one:
        real[0] |= ~real.any()
    return real


class Idefics3Family(ModelFamily):
    """Idefics3 / SmolVLM / SmolVLM2: image splitting, the connector as projector."""

    name = "idefics3"
    title = "Idefics3 (SmolVLM)"
    model_types = ("idefics3", "smolvlm")
    image_input_names = ("pixel_values", "pixel_attention_mask")

    # --- prompt, answer and image inputs
    def default_prompt(self, processor, question: str = DEFAULT_QUESTION) -> str:
        return chat_prompt(processor, question, "Idefics3/SmolVLM")

    def load_processor(self, source: str, trust_remote_code: bool = False):
        """``AutoProcessor``; where it cannot build SmolVLM2's (no torchvision for its video
        processor, or no num2words), the image-only processor from the saved parts."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        error = None
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
            if hasattr(processor, "image_processor"):
                return processor
        except (OSError, ImportError, ValueError) as e:
            error = e
        from transformers.utils import cached_file

        settings = {}
        path = cached_file(source, "processor_config.json",
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is not None:
            import json

            with open(path) as f:
                settings = json.load(f)
        if settings.get("processor_class", "").removesuffix("Fast") not in ("SmolVLMProcessor",):
            if error is not None:
                raise error
            raise UserError(f"cannot build the Idefics3 processor of {source}")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(source)
        return image_only_smolvlm_processor_class()(
            image_processor=image_processor, tokenizer=tokenizer,
            image_seq_len=settings.get("image_seq_len", 169),
            chat_template=getattr(tokenizer, "chat_template", None))

    def fix_processor(self, processor, config) -> None:
        """Nothing to fix; a processor whose tiles or token count do not fit the model is an
        error here rather than a shape mismatch inside the forward."""
        vc = config.vision_config
        expected = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor**2
        if getattr(processor, "image_seq_len", None) != expected:
            raise UserError(f"the processor gives {getattr(processor, 'image_seq_len', None)} "
                            f"image tokens per sub-image but the model expects {expected}")
        tile = _longest_edge(getattr(processor.image_processor, "max_image_size", None))
        if tile is not None and tile != vc.image_size:
            raise UserError(f"the image processor cuts {tile} px tiles but the vision encoder "
                            f"sees {vc.image_size} px images; fix max_image_size")

    def image_inputs(self, processor, image) -> dict:
        """``pixel_values`` [1, n, 3, H, W] and ``pixel_attention_mask`` [1, n, H, W] (uint8),
        padded to n = :func:`max_sub_images` with all-zero sub-images; the mask's valid pixels
        hold ``1 + rows`` of the tile grid (see the module docstring).

        Every sub-image the processor makes is a whole tile, all valid: the mask is then one
        value per sub-image expanded over H x W (a view), so the feature cache, which keeps each
        image's inputs beside its row, keeps bytes, not SmolVLM's 17 x 512 x 512 per image."""
        import torch

        out = processor.image_processor(images=[[image]], return_tensors="pt",
                                        return_row_col_info=True)
        pixels = out["pixel_values"]
        n, (height, width) = pixels.shape[1], pixels.shape[-2:]
        marker = 1 + int(out["rows"][0][0])
        target = max(n, max_sub_images(processor) or n)
        if n < target:
            pixels = torch.cat([pixels, pixels.new_zeros((1, target - n, *pixels.shape[2:]))], 1)
        mask = out.get("pixel_attention_mask")
        mask = (torch.ones((1, n, height, width), dtype=torch.bool) if mask is None
                else mask.gt(0))
        valid, whole = mask.flatten(2).any(dim=-1), mask.flatten(2).all(dim=-1)
        if bool((whole | ~valid).all()):  # one value per sub-image
            per = torch.zeros((1, target), dtype=torch.uint8)
            per[:, :n] = valid.to(torch.uint8) * marker
            mask = per[:, :, None, None].expand(1, target, height, width)
        else:
            mask = torch.cat([mask.to(torch.uint8) * marker,
                              torch.zeros((1, target - n, height, width), dtype=torch.uint8)], 1)
        return {"pixel_values": pixels, "pixel_attention_mask": mask}

    def _grid(self, image_inputs: dict) -> tuple[int, int]:
        """(rows, cols) of one image's tile grid; (0, 0) when it is not split."""
        mask = image_inputs.get("pixel_attention_mask")
        if mask is None:
            raise UserError("Idefics3 image inputs need the pixel_attention_mask of image_inputs()")
        n_real = int(mask[0].flatten(1).gt(0).any(dim=1).sum())
        rows = int(mask.max()) - 1
        if n_real == 1 and rows == 0:
            return 0, 0
        if rows < 1 or (n_real - 1) % rows:
            raise UserError(f"image inputs with {n_real} sub-images carry no tile grid; build "
                            "them with the family's image_inputs()")
        return rows, (n_real - 1) // rows

    @staticmethod
    def _image_string(processor, rows: int, cols: int) -> str:
        """What the processor writes for one image of this grid (its own helper)."""
        return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, image_idx=0)

    def _count(self, processor, rows: int, cols: int) -> int:
        # The image string starts and ends with special tokens: it tokenises alone as in context.
        return len(processor.tokenizer(self._image_string(processor, rows, cols),
                                       add_special_tokens=False, verbose=False).input_ids)

    def num_image_tokens(self, processor, image_inputs: dict) -> int:
        """All the tokens the processor writes for the image: image tokens of every sub-image,
        their ``<fake_token_around_image>`` / ``<global-img>`` / ``<row_i_col_j>`` markers and
        the tile rows' line breaks."""
        return self._count(processor, *self._grid(image_inputs))

    def prompt_ids(self, processor, prompt: str, num_image_tokens: int) -> list[int]:
        tokenizer = processor.tokenizer
        if prompt.count(IMAGE_TOKEN) != 1:
            raise UserError(f"the prompt must contain {IMAGE_TOKEN} exactly once: {prompt!r}")
        # The grid whose image string has this many tokens (unique: rows < image_seq_len + 2).
        bound = max_sub_images(processor) or 37  # unbounded: SmolVLM's <row_i_col_j> go to 6x6
        grids = [(0, 0)] + [(r, c) for r in range(1, bound) for c in range(1, bound)
                            if r * c + 1 <= bound]
        found = {self._image_string(processor, r, c) for r, c in grids
                 if self._count(processor, r, c) == num_image_tokens}
        if len(found) != 1:
            raise UserError(f"no single image layout of {num_image_tokens} tokens for this "
                            "processor")
        image_string = found.pop()
        # add_special_tokens as the processor tokenises (SmolVLM's tokenizer adds nothing).
        ids = tokenizer(prompt.replace(IMAGE_TOKEN, image_string),
                        add_special_tokens=True).input_ids
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if ids.count(image_id) != image_string.count(IMAGE_TOKEN):
            raise UserError(f"the tokenizer does not keep {IMAGE_TOKEN} as one token")
        return list(ids)

    def answer_ids(self, tokenizer, caption: str) -> list[int]:
        # The prompt ends with "Assistant:" and SmolVLM answers after a space ("Assistant: The
        # image shows ..."; its chat template writes ": " before an assistant turn's text).
        caption = caption.strip()
        if not caption:
            return []  # encode_text refuses an empty answer by name
        return list(tokenizer(" " + caption, add_special_tokens=False).input_ids)

    def end_ids(self, tokenizer) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(END_OF_TURN)]

    # --- where things are
    def vision_encoder(self, model):
        return unwrap(model).model.vision_model

    checkpoint_keys = r"(model\.(text_model|vision_model|connector)|lm_head)\."  # SmolVLM's
    language_lora_targets = TEXT_TARGETS
    connector_lora_targets = CONNECTOR_TARGETS

    def projector_module_names(self) -> list[str]:
        return ["connector"]

    def fsdp_wrap_classes(self, model) -> list[str]:
        inner = unwrap(model).model
        return [type(inner.text_model.layers[0]).__name__,
                type(inner.vision_model.encoder.layers[0]).__name__]

    def unquantized_modules(self) -> list[str]:
        return ["vision_model", "connector", "lm_head"]

    # --- the cached-encoder fast path
    def vision_features(self, model, image_inputs: dict):
        """The vision encoder's output per sub-image, [images, sub-images, patches, width]
        (zeros at padding sub-images), captured by a pre-hook on the connector during the
        library's own ``get_image_features``."""
        inner = unwrap(model).model
        pixels = image_inputs["pixel_values"]
        mask = image_inputs.get("pixel_attention_mask")
        captured = capture_input(inner.connector, lambda: inner.get_image_features(
            pixel_values=pixels, pixel_attention_mask=mask))
        b, n = pixels.shape[:2]
        real = _real_images(pixels.to(inner.dtype).flatten(0, 1), self._keeps_one(inner))
        out = captured.new_zeros((b * n, *captured.shape[1:]))
        out[real.to(out.device)] = captured
        return out.view(b, n, *captured.shape[1:])

    def split_features(self, features, image_inputs: dict) -> list:
        """One [1, sub-images, patches, width] row per image; they concatenate back into the
        cached ``pixel_values`` of a batch (padding sub-images stay zero and are dropped)."""
        return list(features.split(1, dim=0))

    @staticmethod
    def _keeps_one(inner) -> bool:
        return getattr(inner.config, "model_type", "") == "smolvlm"

    @contextlib.contextmanager
    def cached_features(self, model):
        """``get_image_features`` replaced (on this instance) by the connector applied to cached
        encoder output ([images, sub-images, patches, width]): the library's forward and
        generate splice the result in as fresh output, the connector runs inside the forward."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inner = unwrap(model).model
        keep_one = self._keeps_one(inner)

        def from_cached(self, pixel_values, pixel_attention_mask=None, **_kwargs):
            b, n = pixel_values.shape[:2]
            states = pixel_values.flatten(0, 1)
            real = _real_images(states, keep_one)
            states = states[real].to(self.connector.modality_projection.proj.weight.dtype)
            features = self.connector(states)
            per_image = real.view(b, n).sum(dim=1).tolist()
            return BaseModelOutputWithPooling(
                last_hidden_state=states,
                pooler_output=[f.reshape(-1, f.shape[-1]) for f in features.split(per_image)])

        inner.get_image_features = types.MethodType(from_cached, inner)
        try:
            yield model
        finally:
            del inner.get_image_features


IDEFICS3 = Idefics3Family()
