"""A tiny random-initialised Qwen2-VL with its processor, built offline: a byte-level BPE
tokenizer with Qwen's special tokens and chat template, a 3-layer ViT on 8 px patches (64 px
images -> 8x8 patches -> 16 image tokens after the 2x2 merger), a 2-layer Qwen2 decoder."""

from __future__ import annotations

from galaxy_llava.models.qwen2_vl import image_only_processor_class
from galaxy_llava.toy.bpe import tokenizer_corpus, train_byte_bpe

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, for text and images (no system turn, no video).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_SIZE, PATCH, MERGE = 64, 8, 2


def build_processor():
    """The image-only Qwen2-VL processor with a locally trained tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    prompts = [f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n"
               "<|im_start|>assistant\n" for q in ("Describe this galaxy.", "What do you see?")]
    tok = train_byte_bpe(tokenizer_corpus(prompts), SPECIAL, vocab_size=800,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=SPECIAL[1:], model_max_length=512,
                         chat_template=CHAT_TEMPLATE)
    pixels = IMAGE_SIZE * IMAGE_SIZE  # every image resized to 64x64: one grid, one token count
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH,
        merge_size=MERGE, temporal_patch_size=2)
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tok,
                                        chat_template=CHAT_TEMPLATE)


def build_model_in_memory(seed: int = 0, device=None, dtype=None):
    """``(model, processor)``: the tiny Qwen2-VL (~0.8 M parameters), in eval mode."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    vocab = -(-len(tok) // 64) * 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=3, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(
            config, dtype=dtype or torch.float32, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"],
                                               pad_token_id=tok.pad_token_id)
    return model.eval(), processor


def build_qwen2_5_vl_in_memory(seed: int = 0, device=None, dtype=None):
    """``(model, processor)``: a tiny Qwen2.5-VL (windowed ViT, 2 layers, one of them full
    attention) with the tiny Qwen2-VL's processor, in eval mode. Not in ``TINY_BUILDERS``
    (see ``toy.tiny.NO_TINY_BUILDER``): it is for the tests of what Qwen2.5-VL changes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=-(-len(tok) // 64) * 64, hidden_size=128, intermediate_size=344,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None,
            eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=128, patch_size=PATCH, spatial_merge_size=MERGE,
                           temporal_patch_size=2, in_channels=3, window_size=32,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype or torch.float32, attn_implementation="sdpa")
    return model.eval(), processor
