"""fastText's subword units: character n-grams with boundary markers, hashed into buckets.

Paper: P. Bojanowski, E. Grave, A. Joulin & T. Mikolov, "Enriching Word Vectors with Subword Information",
TACL 2017, arXiv:1607.04606. A word is wrapped in the boundary symbols ``<`` and ``>`` (so the prefix "<wh"
differs from the "wh" inside "nowhere") and represented by its character n-grams, 3 <= n <= 6 by default, plus
the word itself. The paper's example, "where" with n = 3: ``<wh, whe, her, ere, re>`` and the special sequence
``<where>``. The n-grams are counted over Unicode characters; the whole bracketed word is one of them when it is
no longer than ``max_n``; the markers alone never are (they would be 1-grams).

There are far too many distinct n-grams to give each a row, so each is hashed into one of ``bucket`` rows
(collisions are accepted) with the 32-bit FNV-1a hash of its UTF-8 bytes. The reference implementation adds
each byte as a *signed* char, so bytes >= 0x80 enter the hash sign-extended to 32 bits; we do the same so that
non-ASCII n-grams land in the same buckets as in fastText and gensim (tests/test_word_vectors.py compares with
gensim's ``compute_ngrams`` and ``ft_ngram_hashes``).

A word's input vector is the mean of its own row and its n-gram rows (``word2vec.py`` trains those rows); a
word never seen in training gets the mean of its n-gram rows (``WordVectors.vector``).
"""

from __future__ import annotations

FNV_OFFSET = 2166136261
FNV_PRIME = 16777619


def char_ngrams(word: str, min_n: int = 3, max_n: int = 6) -> list[str]:
    """The character n-grams of ``<word>``, shortest first, each length left to right; as in fastText, the
    boundary markers alone ("<", ">": n = 1) are not n-grams."""
    w = f"<{word}>"
    return [w[i:i + n] for n in range(min_n, min(len(w), max_n) + 1) for i in range(len(w) - n + 1)
            if not (n == 1 and w[i] in "<>" and i in (0, len(w) - 1))]


def ngram_hash(ngram: str) -> int:
    """32-bit FNV-1a over the UTF-8 bytes, each byte sign-extended as a C ``int8_t`` (fastText's quirk)."""
    h = FNV_OFFSET
    for b in ngram.encode("utf-8"):
        h ^= b if b < 0x80 else (b - 0x100) & 0xFFFFFFFF
        h = (h * FNV_PRIME) & 0xFFFFFFFF
    return h


def ngram_buckets(word: str, min_n: int, max_n: int, bucket: int) -> list[int]:
    """The bucket (row in the n-gram table) of each of ``word``'s n-grams, in ``char_ngrams`` order."""
    return [ngram_hash(g) % bucket for g in char_ngrams(word, min_n, max_n)]
