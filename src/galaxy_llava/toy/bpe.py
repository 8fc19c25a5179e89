"""The tiny models' tokenizers, trained here without a download: the text they are trained on
(:func:`tokenizer_corpus`, shared by every family) and a byte-level BPE tokenizer for the chat
families (Qwen2-VL, Idefics3), whose real tokenizers are byte-level BPE too: the same
pre-tokenisation, special tokens as single pieces, and a chat template. (LLaVA's SentencePiece
tokenizer is trained in :mod:`galaxy_llava.toy.tiny` on the same corpus.)"""

from __future__ import annotations

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.rules import RULE_SETS

GENERIC_ENGLISH = (
    "The quick brown fox jumps over the lazy dog. What is this? It is a picture of the night sky. "
    "Please describe the image in one sentence. The telescope observed a bright star, a faint "
    "nebula and a distant cluster of galaxies. Astronomers classify galaxies by their shape: some "
    "are smooth and round, others have a disk, spiral arms, a bar or a bulge. Answer the question "
    "about the photo. There are 0 1 2 3 4 5 6 7 8 9 numbers and punctuation: ; ! ? ( ) - ' \" ."
)


def tokenizer_corpus(prompts: list[str] | None = None) -> list[str]:
    """Caption grammar (every reachable caption of every rule set), prompts and generic English."""
    captions = sorted({m.caption() for rule_set in RULE_SETS.values()
                       for m in rule_set.reachable()})
    from galaxy_llava.toy.pretrain import PRETRAIN_PROMPT, scene_words  # imports torch

    prompts = prompts or [DEFAULT_PROMPT, PRETRAIN_PROMPT, "USER: <image>\nWhat is this? ASSISTANT:"]
    # Repetition weights the prompt and generic words so they become whole pieces too.
    return captions * 4 + prompts * 40 + [GENERIC_ENGLISH] * 10 + scene_words()


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
