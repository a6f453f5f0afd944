"""o200k_harmony: the gpt-oss tokenizer, built on tiktoken from the o200k_base ranks.

o200k_harmony is o200k_base (ranks 0..199997) plus the Harmony special tokens at fixed ids, with
reserved tokens filling the vocabulary up to the model's 201088 rows (ids from openai-harmony's
`tiktoken_ext/public_encodings.rs`; docs/ARCHITECTURE.md §4 lists the ones the renderer uses).

Where the vocab comes from, in order:
1. `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (the variable openai-harmony reads);
2. tiktoken's own cache, `$TIKTOKEN_CACHE_DIR/<sha1 of the URL>`, or a download into it.
Both are checked against the published sha256. Library code never sets these variables.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os

import tiktoken
import tiktoken.load

from data.errors import DataError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # rows of embed_tokens / lm_head

# Pre-tokenization regex of o200k_base (the order of the alternatives matters).
_PAT_STR = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

STARTOFTEXT, PAD = 199998, 199999  # <|endoftext|> doubles as the padding id
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = 200002, 200003, 200005, 200006, 200007, 200008, 200012

SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": PAD,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


class VocabUnavailable(DataError):
    """The o200k_base vocab could be neither found locally nor downloaded."""


def _parse_tiktoken_file(contents: bytes) -> dict[bytes, int]:
    # Format: one "<base64 token> <rank>" per line.
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in contents.splitlines() if line)}


def _read_ranks() -> dict[bytes, int]:
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and os.path.isfile(path := os.path.join(base, "o200k_base.tiktoken")):
        with open(path, "rb") as f:
            contents = f.read()
        if hashlib.sha256(contents).hexdigest() != O200K_SHA256:
            raise VocabUnavailable(f"{path} is not o200k_base (sha256 mismatch); replace it or unset TIKTOKEN_ENCODINGS_BASE")
        return _parse_tiktoken_file(contents)
    try:
        # Honours TIKTOKEN_CACHE_DIR (file named by the sha1 of the URL); downloads when absent.
        return tiktoken.load.load_tiktoken_bpe(O200K_URL, expected_hash=O200K_SHA256)
    except Exception as e:  # network errors come in many types (requests, ssl, blobfile)
        raise VocabUnavailable(
            "cannot load the o200k_base vocab (offline?): put o200k_base.tiktoken in a folder and point "
            "TIKTOKEN_ENCODINGS_BASE at it, or point TIKTOKEN_CACHE_DIR at a tiktoken cache that holds it "
            f"(file {hashlib.sha1(O200K_URL.encode()).hexdigest()}); cause: {type(e).__name__}: {e}"
        ) from e


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The o200k_harmony encoding (loaded once per process)."""
    ranks = _read_ranks()
    specials = dict(SPECIAL_TOKENS)
    specials.update({f"<|reserved_{i}|>": i for i in range(STARTOFTEXT, VOCAB_SIZE) if i not in specials.values()})
    return tiktoken.Encoding("o200k_harmony", pat_str=_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=specials, explicit_n_vocab=VOCAB_SIZE)
