"""Tiny tokenizers built locally, so that no test ever touches the Hugging Face hub.

`make_tiny_tokenizer` is a real (lower-cased, character-level BPE) tokenizer whose ids all fit in a
tiny model's embedding (`vocab_size` <= the model's); `make_word_tokenizer` maps each word to a
known id, for tests that check exact token ids by hand.
"""

from __future__ import annotations

import random
import string

from transformers import PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<|endoftext|>", "<pad>")  # ids 0, 1, 2
ALPHABET = list(string.ascii_lowercase + string.digits + ".,!?'-:;\"()") + ["\u2581"]
MIN_VOCAB = len(SPECIALS) + len(ALPHABET)

# Enough distinct words that BPE can learn a few hundred merges (so vocab_size=256 is reached).
_TRAIN_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "and kings of england sail rivers under pale moons singing old songs of grace "
    "in that is was he for it with as his on be at by lord god said they we you she her them this "
    "from have had not but what all were when there can an your which their if do will each about "
    "how up out many then so some would make like into time has look two more write go see number "
    "no way could people my than first water been call who oil its now find long down day did get "
    "come made may part over new sound take only little work know place year live me back give most "
    "very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set "
    "put end does another well large must big even such because turn here why ask went men read need "
    "land different home us move try kind hand picture again change off play spell air away animal "
    "house point page letter mother answer found study still learn should america world high every "
    "near add food between own below country plant last school father keep tree never start city earth"
).split()


def _training_text(seed: int = 0, docs: int = 400, words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_TRAIN_WORDS) for _ in range(words)) + rng.choice(".!?") for _ in range(docs)]


def make_tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with at most `vocab_size` ids (exactly that many for 96..256).

    Specials: `<unk>`=0, `<|endoftext|>`=1 (EOS), `<pad>`=2. Text is lower-cased; characters
    outside [a-z0-9] and common punctuation become `<unk>`, so any string tokenizes. Decoding
    restores spaces (Metaspace). Saves with `save_pretrained` and reloads with AutoTokenizer.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (specials + alphabet), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=ALPHABET, limit_alphabet=len(ALPHABET), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    assert tok.get_vocab_size() <= vocab_size, (tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def make_word_tokenizer(words: list[str], *, eos: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with predictable ids: `<unk>`=0, `<eos>`=1, `<pad>`=2, words from 3.

    With `eos=False` the tokenizer has no EOS token (packing then joins documents directly); with
    `bos=True` it prepends `<bos>` (id after the words) to every text by default, like Llama's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    if bos:
        vocab["<bos>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"eos_token": "<eos>"} if eos else {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
        kw["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", **kw)
