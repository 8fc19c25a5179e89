"""A byte-level BPE tokenizer trained here, for the tiny models of the chat families (Qwen2-VL,
Idefics3), whose real tokenizers are byte-level BPE too: the same pre-tokenisation, special
tokens as single pieces, and a chat template, without a download."""

from __future__ import annotations


def train_byte_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int = 800, **kwargs):
    """A ``PreTrainedTokenizerFast`` over ``corpus`` (byte-level, so any text encodes) whose
    ``special_tokens`` are one piece each (ids from 0, in order); ``kwargs`` go to the tokenizer
    (``eos_token``, ``pad_token``, ``chat_template``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
