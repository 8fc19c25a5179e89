"""The model-family interface: what the product needs to know about one kind of vision-language
model (:mod:`.registry` picks the family of a checkpoint by its ``model_type``).

Everything family-specific (how many image tokens the processor expands ``<image>`` to, where the
vision encoder and the projector are, which modules LoRA adapts, how to capture the frozen
encoder's output and feed it back cached) lives behind :class:`ModelFamily`; training, description
and evaluation never name a family's modules. A new family is one new module and one registry entry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from galaxy_llava.config import DEFAULT_QUESTION
from galaxy_llava.errors import UserError

# Stands for the question while a family's prompt format is rendered, to find where it goes.
_QUESTION_SLOT = "\x00galaxy-llava-question\x00"


class ModelFamily:
    """One family of image-text-to-text models (subclass per family; see ``models/llava.py``)."""

    name: str = ""
    title: str = ""  # the family as people write it, for messages ("Qwen2-VL")
    model_types: tuple[str, ...] = ()
    cacheable: bool = True  # whether cached encoder output replays exactly (else: uncached)

    # --- prompt, answer and image inputs
    def default_prompt(self, processor, question: str = DEFAULT_QUESTION) -> str:
        """The training prompt when none is given: the family's chat format with one image
        placeholder and the question, ending where the answer starts."""
        raise NotImplementedError

    def chat_template(self, processor, prompt: str) -> tuple[str, str]:
        """``(template, question)``: a chat template under which one user turn holding an image
        and ``question`` renders exactly as ``prompt`` (plain ``apply_chat_template`` then gives
        the training prompt), and that question. A prompt in the family's own format keeps the
        processor's template where it has one (system turns and all) and gets the question that
        fills it; any other prompt's question is everything after its image placeholder."""
        image = self.image_placeholder
        if prompt.count(image) != 1:
            raise UserError(f"the prompt must contain {image} exactly once: {prompt!r}")
        try:
            before, after = self.default_prompt(processor, _QUESTION_SLOT).split(_QUESTION_SLOT)
        except (UserError, ValueError):  # no chat template to read the format from
            before, after = "", ""
        fits = (image in before and prompt.startswith(before) and prompt.endswith(after)
                and len(prompt) >= len(before) + len(after))
        if fits:
            question = prompt[len(before):len(prompt) - len(after)]
            existing = getattr(processor, "chat_template", None)
            with contextlib.suppress(Exception):  # a template that cannot render this turn
                if existing and chat_prompt(processor, question, self.name) == prompt:
                    return existing, question
            head, mid = before.split(image, 1)
            tail = after
        else:
            head, question = prompt.split(image, 1)
            mid = tail = ""
        end = "".join(processor.tokenizer.convert_ids_to_tokens(self.end_ids(processor.tokenizer)))
        return prompt_template(head, image, mid, tail, self.answer_separator, end), question

    def fix_processor(self, processor, config) -> None:
        """Make ``processor`` expand images to exactly the tokens the model expects."""

    def image_inputs(self, processor, image) -> dict:
        """The model inputs of one PIL image, as tensors that concatenate along dim 0 into a
        batch (``pixel_values`` and whatever else the family needs, e.g. a grid)."""
        out = processor.image_processor(images=[image], return_tensors="pt")
        return {k: v for k, v in out.items() if k in self.image_input_names}

    image_input_names: tuple[str, ...] = ("pixel_values",)
    image_placeholder: str = "<image>"  # what the prompt holds where the image goes
    answer_separator: str = " "  # written between the prompt and the answer ("ASSISTANT: This")

    def num_image_tokens(self, processor, image_inputs: dict) -> int:
        """How many image tokens the prompt holds for one image with these inputs."""
        raise NotImplementedError

    def prompt_ids(self, processor, prompt: str, num_image_tokens: int) -> list[int]:
        """Token ids of ``prompt`` with its one image placeholder expanded to
        ``num_image_tokens`` tokens. Training and generation both use it: identical ids."""
        raise NotImplementedError

    def answer_ids(self, tokenizer, caption: str) -> list[int]:
        """The caption's ids as they follow the prompt at generation time (no end token).
        Default: a SentencePiece-style answer after a space (``▁This``)."""
        caption = caption.strip()
        if not caption:
            return []  # encode_text refuses an empty answer by name
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        first = tokenizer.convert_ids_to_tokens(ids[0]) if ids else ""
        if not first.startswith(("▁", "Ġ", " ")):
            # A tokenizer without SentencePiece's dummy prefix: spell the separating space out.
            ids = tokenizer(" " + caption, add_special_tokens=False).input_ids
        return list(ids)

    def end_ids(self, tokenizer) -> list[int]:
        """The token(s) that end an answer: learnt after the caption, where generation stops."""
        return [tokenizer.eos_token_id]

    def token_inputs(self, input_ids, processor) -> dict:
        """Per-token inputs the model needs beside ``input_ids`` (built from padded ids)."""
        return {}

    def prefix_positions(self, model, input_ids, attention_mask, inputs: dict):
        """``(position_ids, following)`` of a left-padded batch of prompts: the positions the
        language model gives the real tokens in a plain unpadded forward, and the position of
        the token that follows each prompt. Default: 1-D rotary positions counting real tokens.
        Caption scoring continues the prompts' cache at ``following`` + depth."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return positions, attention_mask.sum(-1)

    def continuation_positions(self, following, offsets):
        """Position ids of tokens ``offsets`` (1-D) after each prompt whose next position is
        ``following`` (:meth:`prefix_positions`)."""
        return following[:, None] + offsets[None, :]

    # --- where things are
    def vision_encoder(self, model):
        """The vision encoder module of a (possibly peft-wrapped) model."""
        raise NotImplementedError

    def encoder_parameters(self, model):
        """The parameters that stay frozen: the vision encoder's, without the projector where
        the family keeps it inside the encoder module."""
        return self.vision_encoder(model).parameters()

    def load_processor(self, source: str, trust_remote_code: bool = False):
        """The checkpoint's processor (``AutoProcessor``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    # --- the layout of the family's published Hub checkpoints (what exports are written in)
    # A regex that the start of every weight name in the family's published checkpoints matches.
    checkpoint_keys: str = ""
    # Notes for the model card on loading a saved folder: (text, Python) pairs.
    card_notes: tuple[tuple[str, str], ...] = ()

    def save_processor(self, processor, folder) -> None:
        """Save ``processor`` as the family's published checkpoints hold it: transformers 5's
        ``processor_config.json`` and tokenizer files, plus the image processor's own
        ``preprocessor_config.json`` (and a video processor's
        ``video_preprocessor_config.json``), which older transformers and other engines read."""
        processor.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        video = getattr(processor, "video_processor", None)
        if video is not None:
            video.save_pretrained(folder)

    # peft target_modules regexes of the family: the language model's linears, the connector's.
    language_lora_targets: str = ""
    connector_lora_targets: str = ""

    def lora_target_modules(self, projector: str) -> str:
        """peft ``target_modules`` regex: the language model's linears, plus the connector when
        ``projector == "lora"``; never the vision encoder."""
        return self.language_lora_targets + (
            "|" + self.connector_lora_targets if projector == "lora" else "")

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
    def vision_features(self, model, image_inputs: dict):
        """The frozen encoder's output for a batch of image inputs: exactly what the
        projector receives, concatenated along dim 0 as the images are."""
        raise NotImplementedError

    def split_features(self, features, image_inputs: dict) -> list:
        """:meth:`vision_features` of a batch cut into one tensor per image (each concatenates
        back along dim 0). Default: one row per image."""
        return list(features.split(1, dim=0))

    def cached_features(self, model) -> contextlib.AbstractContextManager:
        """While active, the model's ``pixel_values`` input carries :meth:`vision_features`
        instead of images (the encoder is skipped; the projector still runs inside forward)."""
        raise NotImplementedError


class _Captured(Exception):
    """Carries a module's input out of a forward (stops it there)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def capture_input(module, run: Callable[[], Any]):
    """The first positional input ``module`` receives while ``run()`` executes, taken by a
    forward pre-hook that stops the forward there (under ``no_grad``, not ``inference_mode``:
    the result is later saved for the connector's backward). The families capture their frozen
    encoder's output at the connector this way, during the library's own
    ``get_image_features``, so layer and token selection cannot drift from transformers'."""
    import torch

    def hook(_module, args):
        raise _Captured(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _Captured as c:
        return c.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} was never called")


def chat_prompt(processor, question: str, family_name: str) -> str:
    """The processor's chat template rendered for one image and ``question``, ending where
    the assistant's answer starts."""
    if not getattr(processor, "chat_template", None):
        raise UserError(f"this {family_name} processor has no chat template; pass --prompt")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_template(head: str, image: str, mid: str, tail: str, answer_prefix: str,
                    end: str) -> str:
    """A Jinja chat template writing a user turn as ``head + image (per image) + mid + text +
    tail`` and an assistant turn as ``answer_prefix + text + end`` (inside ``generation`` tags,
    for assistant-only losses); a system turn is an error (none was trained). The fixed pieces
    are JSON string literals, which Jinja reads back unchanged whatever they hold."""
    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"

    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set text = message['content'] -%}{%- set images = 0 -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}"
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image')"
        " | list | length -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        + lit(head) + "{{ " + json.dumps(image) + " * images }}" + lit(mid) + "{{ text }}"
        + lit(tail) +
        "{%- elif message['role'] == 'assistant' -%}"
        + lit(answer_prefix) + "{% generation %}{{ text }}" + lit(end) + "{% endgeneration %}"
        "{%- else -%}"
        "{{ raise_exception('this model was trained on user and assistant turns only, not '"
        " + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}")


def unwrap(model) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
