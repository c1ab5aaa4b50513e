"""A word-level tokenizer for the shapes world's vocabulary (stage 4 of ``python -m train.shapes``).

Every word the world can write (captions, questions, answers, instructions, compose prompts) and the words the
library's modes add (the VQA template ``Q: ... A:``, the short-answer hint, the perception presets) gets one id.
Special ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; the mask token ``<extra_id_0>`` (T5's name for the
mask) is the last id. Text is lower-cased and split like a whitespace/punctuation pre-tokenizer (``\\w+`` or a
run of punctuation); every encoding ends with ``</s>``. The transformer's text head and the T5 table both have
``len(tokenizer)`` rows.
"""

from __future__ import annotations

import itertools
import os
import re

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from unialign_core.modes import PERCEPTION_PRESETS, SHORT_ANSWER_SUFFIX, VQA_TEMPLATE

from . import world as w

PAD, EOS, UNK, MASK = "<pad>", "</s>", "<unk>", "<extra_id_0>"
SPECIALS = (PAD, EOS, UNK)
_TOKEN = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The tokens of a text as the tokenizer splits it (lower-cased, placeholders like ``{kind}`` removed)."""
    return _TOKEN.findall(re.sub(r"\{\w+\}", " ", text).lower())


def world_texts() -> list[str]:
    """Every template and name the world and the modes can put into a text."""
    texts = list(w.COLOURS) + list(w.BACKGROUNDS) + list(w.KINDS) + list(w.POSITIONS) + list(w.SIZES)
    texts += list(w.COUNT_WORDS.values()) + ["yes", "no", "edge map of", "depth map of"]
    texts += [p for phrases in w.POSITION_PHRASES.values() for p in phrases]
    texts += [p for phrases in w.TO_POSITION.values() for p in phrases]
    texts += list(w.CAPTION_TEMPLATES) + list(w.COMPOSE_TEMPLATES) + ["a", "and"]
    texts += list(itertools.chain.from_iterable(w.VQA_TEMPLATES.values()))
    texts += list(itertools.chain.from_iterable(w.EDIT_TEMPLATES.values()))
    texts += list(w.EDGE_INSTRUCTIONS) + list(w.DEPTH_INSTRUCTIONS) + list(PERCEPTION_PRESETS.values())
    texts += [VQA_TEMPLATE, SHORT_ANSWER_SUFFIX]
    return texts


def world_vocabulary() -> list[str]:
    """All tokens, specials first, then the world's words sorted, then the mask token (stable across runs)."""
    words = sorted({tok for text in world_texts() for tok in words_of(text)})
    return list(SPECIALS) + words + [MASK]


def build_tokenizer(vocabulary: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer (T5-like special ids, the mask token last)."""
    vocab = vocabulary or world_vocabulary()
    if tuple(vocab[:3]) != SPECIALS or vocab[-1] != MASK or len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary must start with <pad>, </s>, <unk>, end with the mask token, and be unique")
    tok = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, mask_token=MASK)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str) -> str:
    """Write the tokenizer folder (``tokenizer.json`` + config) that ``AutoTokenizer`` and our loader read."""
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


def unknown_words(tokenizer, texts) -> set:
    """Words of ``texts`` that the tokenizer maps to ``<unk>``."""
    unk = tokenizer.unk_token_id
    found = set()
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False)
        for tok_id, (a, b) in zip(
            enc["input_ids"], tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        ):
            if tok_id == unk:
                found.add(text[a:b])
    return found
