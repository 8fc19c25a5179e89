"""A tiny random-initialised Idefics3 (SmolVLM's architecture) with its processor, built offline:
a byte-level BPE tokenizer with SmolVLM's special tokens and chat template, a 3-layer SigLIP-style
vision encoder on 8 px patches (64 px images -> 8x8 patches -> 16 image tokens after the 2x2
pixel shuffle of the connector), a 2-layer Llama decoder; ~0.8 M parameters.

Image splitting is off: every image is resized to one 64 px tile, so every image gives the same
tokens (``<fake_token_around_image><global-img>`` + 16 ``<image>`` + ``<fake_token_around_image>``).
Turn it on (``processor.image_processor.do_image_splitting = True`` with a larger ``size``) to
get SmolVLM's tiles."""

from __future__ import annotations

from galaxy_llava.toy.bpe import tokenizer_corpus, train_byte_bpe

# SmolVLM's special tokens (HuggingFaceTB/SmolVLM-*): the tile grid <row_i_col_j> is what
# Idefics3Processor writes when it splits an image.
SPECIAL = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
            "<fake_token_around_image>", "<image>", "<global-img>"]
           + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
# SmolVLM's chat template for text and images (transformers' smolvlm DEFAULT_CHAT_TEMPLATE
# without the video branch): "<|im_start|>User:<image>Question<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IMAGE_SIZE, PATCH, SCALE = 64, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2  # 16 <image> tokens per (sub-)image


def build_tokenizer():
    """The byte-level BPE tokenizer: SmolVLM's special tokens (bos ``<|im_start|>``, eos
    ``<end_of_utterance>``, pad ``<|im_end|>`` as in SmolVLM) and chat template."""

    # The answer follows "Assistant:" after a space: " This" becomes one piece, as in SmolVLM's.
    prompts = [f"<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant: This is an image of"
               for q in ("Describe this galaxy.", "What do you see?")]
    return train_byte_bpe(tokenizer_corpus(prompts), SPECIAL, vocab_size=800,
                          bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                          pad_token="<|im_end|>", unk_token="<|endoftext|>",
                          additional_special_tokens=SPECIAL[3:], model_max_length=512,
                          chat_template=CHAT_TEMPLATE)


def build_processor(do_image_splitting: bool = False):
    """``Idefics3Processor`` (torchvision-free PIL image processor) with the local tokenizer:
    64 px tiles, 16 image tokens per tile, splitting off unless asked."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=do_image_splitting)
    return Idefics3Processor(image_processor=image_processor, tokenizer=build_tokenizer(),
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer):
    """The ``Idefics3Config`` of the tiny model for ``tokenizer``."""
    from transformers import Idefics3Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    vocab = -(-len(tokenizer) // 64) * 64
    return Idefics3Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=dict(
            model_type="llama", vocab_size=vocab, hidden_size=128, intermediate_size=344,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=tokenizer.pad_token_id),
        scale_factor=SCALE, image_token_id=ids["<image>"], pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)


def build_model_in_memory(seed: int = 0, device=None, dtype=None):
    """``(model, processor)``: the tiny Idefics3 (~0.8 M parameters), in eval mode."""
    import torch
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration

    processor = build_processor()
    tok = processor.tokenizer
    config = tiny_config(tok)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Idefics3ForConditionalGeneration._from_config(
            config, dtype=dtype or torch.float32, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"),
        pad_token_id=tok.pad_token_id)
    return model.eval(), processor
