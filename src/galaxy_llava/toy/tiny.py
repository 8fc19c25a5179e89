"""Random-initialised models for tests, the demo and benchmarks, built without the Hub, of three
families (:data:`TINY_BUILDERS`): LLaVA (here), Qwen2-VL (:mod:`.tiny_qwen2_vl`) and Idefics3
(:mod:`.tiny_idefics3`); :func:`build_tiny_model` writes any of them as a plain model folder (see
:mod:`galaxy_llava.models.folders`).

LLaVA has three presets: ``tiny`` is CPU-sized; ``mini`` has TinyLLaVA's costly shapes (336 px
images, 576 image tokens, a 32,064-token vocabulary) on two narrow layers per tower, so that a CPU
training step costs what the fast path removes; ``tinyllava`` has TinyLLaVA's shapes. All get a
Llama tokenizer trained here (SentencePiece BPE on :func:`~.bpe.tokenizer_corpus`: the caption
grammar, prompts and generic English) and a CLIP image processor. The other families have the
``tiny`` scale only.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path
from galaxy_llava.models.folders import write_marker
from galaxy_llava.models.registry import family_for
from galaxy_llava.toy import tiny_idefics3, tiny_qwen2_vl
from galaxy_llava.toy.bpe import tokenizer_corpus

# torch and transformers are imported where used: the CLI reads PRESETS for its --help.

PRESETS = ("tiny", "mini", "tinyllava")
_TINY = dict(vision_hidden=64, vision_layers=3, vision_heads=4, vision_mlp=128, image_size=64,
             patch=16, text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=344,
             max_positions=512, spm_vocab=640)
# TinyLLaVA where a step's cost lies (image size, patch, image tokens, vocabulary, head widths of
# 64, a 4x CLIP MLP, grouped KV) but 2 layers per tower and narrow widths: ~18.5 M parameters.
_MINI = dict(vision_hidden=128, vision_layers=2, vision_heads=2, vision_mlp=512, image_size=336,
             patch=14, text_hidden=256, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=704,
             max_positions=2048, spm_vocab=640, vocab=32064)
_TINYLLAVA = dict(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                  image_size=336, patch=14, text_hidden=2048, text_layers=22, text_heads=32,
                  text_kv_heads=4, text_mlp=5632, max_positions=2048, spm_vocab=640, vocab=32064)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    return {"tiny": _TINY, "mini": _MINI, "tinyllava": _TINYLLAVA}[preset]


def preset_shapes(preset: str) -> dict:
    """A preset's sizes (``image_size``, ``patch``, widths, layers, ...), without building it."""
    return dict(_preset(preset))


def _train_sentencepiece(vocab_size: int) -> bytes:
    """A SentencePiece BPE model, Llama's settings (byte fallback, split digits, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    return buf.getvalue()


def build_tokenizer(max_length: int = 512, vocab_size: int = 640):
    """A Llama tokenizer like TinyLLaVA's, from a SentencePiece BPE model trained on the captions.

    Byte fallback (any text encodes), ``<s>``/``</s>``, ``<image>`` then ``<pad>`` added as special
    tokens (pad != eos, as in TinyLLaVA), words carry their leading space (``▁This``).
    Deterministic."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_size))
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True,
                                             add_eos_token=False, model_max_length=max_length)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _image_processor(size: int):
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the torchvision-free class was the only one
        from transformers import CLIPImageProcessor as ImageProcessor
    return ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                          do_center_crop=True, do_resize=True, image_mean=_CLIP_MEAN,
                          image_std=_CLIP_STD, resample=3, do_convert_rgb=True)


def tiny_config(preset: str = "tiny", tokenizer=None):
    """The LlavaConfig of a preset: ``tiny`` (CPU-sized), ``mini`` (TinyLLaVA's image tokens and
    vocabulary on narrow 2-layer towers) or ``tinyllava`` (TinyLLaVA's shapes)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    p = _preset(preset)
    tok = tokenizer or build_tokenizer(p["max_positions"], p["spm_vocab"])
    # Round the vocabulary up like TinyLLaVA's 32064 (a multiple of 64 is faster on GPUs).
    vocab = p.get("vocab") or -(-len(tok) // 64) * 64
    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden"], intermediate_size=p["vision_mlp"],
        num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
        image_size=p["image_size"], patch_size=p["patch"], projection_dim=p["vision_hidden"],
        hidden_act="quick_gelu")
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=p["text_hidden"], intermediate_size=p["text_mlp"],
        num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
        num_key_value_heads=p["text_kv_heads"], max_position_embeddings=p["max_positions"],
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    n_patches = (p["image_size"] // p["patch"]) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_patches,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False)


def build_model_in_memory(preset: str = "tiny", seed: int = 0, device=None, dtype=None):
    """A random-initialised LLaVA of a preset and its processor, built directly on ``device``
    (default CPU) in ``dtype`` (default fp32); returns ``(model, processor)``, model in eval mode.

    For benchmarks of the ``tinyllava`` shapes without writing 5.6 GB: initialising on the GPU
    takes seconds."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    from galaxy_llava.models.loading import resolve_device, resolve_dtype

    p = _preset(preset)
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device) if dtype is not None else torch.float32
    tok = build_tokenizer(p["max_positions"], p["spm_vocab"])
    config = tiny_config(preset, tok)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                           attn_implementation="sdpa")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    processor = LlavaProcessor(
        image_processor=_image_processor(p["image_size"]), tokenizer=tok, patch_size=p["patch"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model.eval(), processor


# The tiny model of each family, by family name: ``builder(seed=, device=, dtype=)`` gives
# ``(model, processor)`` (LLaVA's takes its preset first). Every family the registry
# (:mod:`galaxy_llava.models.registry`) supports has one here or a reason in NO_TINY_BUILDER.
TINY_BUILDERS = {"llava": build_model_in_memory, "qwen2_vl": tiny_qwen2_vl.build_model_in_memory,
                 "idefics3": tiny_idefics3.build_model_in_memory}
NO_TINY_BUILDER = {
    "qwen2_5_vl": "Qwen2-VL's processor, prompt and loading with a windowed ViT: the per-family "
                  "tests run on qwen2_vl, and tests/test_scoring.py builds a tiny Qwen2.5-VL "
                  "(toy.tiny_qwen2_vl.build_qwen2_5_vl_in_memory) for the part that differs, "
                  "its multimodal positions in tree scoring",
}


def build_family_in_memory(family: str = "llava", preset: str = "tiny", seed: int = 0,
                           device=None, dtype=None):
    """``(model, processor)`` of a tiny random-initialised model of ``family``; presets other
    than ``tiny`` exist for LLaVA only."""
    if family not in TINY_BUILDERS:
        raise UserError(f"unknown family {family!r}; expected one of {', '.join(TINY_BUILDERS)}")
    if family == "llava":
        return build_model_in_memory(preset, seed=seed, device=device, dtype=dtype)
    if preset != "tiny":
        raise UserError(f"the {family} family has only the tiny preset")
    return TINY_BUILDERS[family](seed=seed, device=device, dtype=dtype)


def build_tiny_model(out: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                     pretrain_steps: int = 0, device=None, family: str = "llava") -> Path:
    """Write a random-initialised model with its processor and prompt in the Hugging Face layout.

    LLaVA ``tiny`` has 0.72 M parameters (64 px images, 16 image tokens) for CPU tests and the
    demo; ``mini`` has 18.5 M (336 px, 576 image tokens, 32,064-token vocabulary; ~74 MB in
    fp32) for CPU benchmarks; ``tinyllava`` has TinyLLaVA's shapes (1.41 B parameters, saved in
    bf16, ~2.8 GB). ``family`` ``qwen2_vl`` / ``idefics3`` builds the same scale of model of that
    family (tiny only). ``device`` is where the weights are initialised (default CPU; a GPU makes
    the ``tinyllava`` build take seconds); the saved folder is the same either way.
    ``pretrain_steps`` > 0 first trains it to caption generic scenes (see
    :mod:`galaxy_llava.toy.pretrain`) so it can see and speak, as a real base model can; its loss
    is saved beside the weights (``pretrain_loss.json``, summary in ``galaxy_llava.json``)."""
    import torch

    out = Path(out)
    if pretrain_steps < 0:
        raise UserError(f"--pretrain-steps must be >= 0, got {pretrain_steps}")
    model, processor = build_family_in_memory(
        family, preset, seed=seed, device=device,
        dtype=torch.bfloat16 if preset == "tinyllava" else torch.float32)
    if pretrain_steps:
        from galaxy_llava.toy.pretrain import pretrain_tiny

        losses = pretrain_tiny(model, processor, steps=pretrain_steps, seed=seed)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if family == "llava":
            # The SentencePiece model too, as TinyLLaVA ships it (tokenizer.json is authoritative).
            (tmp / "tokenizer.model").write_bytes(_train_sentencepiece(_preset(preset)["spm_vocab"]))
        write_marker(tmp, prompt=family_for(model).default_prompt(processor), kind="model",
                     preset=preset, family=family, seed=seed, pretrain_steps=pretrain_steps)
        if pretrain_steps:  # its loss, with the model it made
            from galaxy_llava.toy.pretrain import save_losses

            save_losses(tmp, losses)
    return out
