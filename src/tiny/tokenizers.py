"""Offline tokenizers for the tiny models: built in memory, no file or network access.

They stand in for the hub tokenizers diffusers' own tests download (hf-internal-testing/tiny-random-clip,
tiny-random-t5). transformers >= 5 tokenizers are `tokenizers`-backed and accept in-memory vocab/merges;
BPE merges must be (a, b) tuples ("a b" strings are rejected).
"""
import string

from transformers import CLIPTokenizer, T5Tokenizer

# A few merges so the BPE merge path is exercised, not only single characters.
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")]
_T5_WORDS = ["the", "a", "of", "and", "cat", "dog", "photo", "painting"]


def byte_chars() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by GPT-2 style byte-level BPE (CLIP, Qwen2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2 order: printable bytes as themselves first (as in the real CLIP vocab, where "!" is id 0),
    # then the other bytes mapped to chr(256), chr(257), ...
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE with CLIP's "</w>" word ends; 518 ids, below the tiny CLIP's vocab_size of 1000.

    Pipelines pad to model_max_length, so it must not exceed the text encoder's max_position_embeddings.
    """
    symbols = byte_chars() + [c + "</w>" for c in byte_chars()] + [a + b for a, b in _CLIP_MERGES]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=_CLIP_MERGES, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """Unigram tokenizer keeping T5's ids pad=0, eos=1, unk=2; no <extra_id_*> sentinels."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -5.0), ("\u2581" + char, -4.0)]
    pieces += [("\u2581" + word, -3.0) for word in _T5_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
