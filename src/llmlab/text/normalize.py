"""Normalisation and splitting: text -> clean text -> sentences -> words.

- ``normalize``: Unicode normal form (NFKC by default, so the ligature "ﬁ" and full-width letters become plain
  letters), lower case, optional accent stripping (NFKD, then combining marks dropped: scikit-learn's
  ``strip_accents="unicode"``), runs of white space collapsed to one space.
- ``split_words``: the tokens a regular expression finds. ``VECTOR_WORDS`` is scikit-learn's default
  ``token_pattern`` (two or more word characters), so features built here line up with ``TfidfVectorizer``;
  ``LM_TOKENS`` keeps one-letter words and each punctuation mark, which a language model must predict too.
- ``split_sentences``: a rule-based splitter. A sentence ends at ``.``, ``!`` or ``?`` (closing quotes and
  brackets stay with it) followed by white space and an upper-case letter, a digit or an opening quote, unless the
  word before the dot is a known abbreviation ("e.g.", "Mr.") or a single letter (an initial); a blank line
  always ends a sentence. It is the heuristic of Grefenstette & Tapanainen (1994), "What is a word, what is a
  sentence?", without their corpus-learned abbreviation list.
"""

from __future__ import annotations

import re
import unicodedata

VECTOR_WORDS = r"(?u)\b\w\w+\b"
LM_TOKENS = r"\w+|[^\w\s]"
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "prof", "st", "no", "fig",
                           "eq", "approx", "resp", "al", "jr", "sr", "inc", "ltd", "co"})

_SPACES = re.compile(r"\s+")
_END = re.compile(r"""[.!?]+['")\]]*(?=\s+['"(\[]?[A-Z0-9])""")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")


def strip_accents(text: str) -> str:
    """"café" -> "cafe": decompose (NFKD) and drop the combining marks."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def normalize(text: str, *, form: str | None = "NFKC", lowercase: bool = True, accents: bool = True,
              collapse_spaces: bool = True) -> str:
    """``text`` in Unicode normal form ``form`` (None: as is), lower-cased, accents kept or stripped, white
    space runs collapsed to one space and the ends trimmed."""
    if form:
        text = unicodedata.normalize(form, text)
    if lowercase:
        text = text.lower()
    if not accents:  # after lower-casing, as scikit-learn does ("İ".lower() has a combining dot)
        text = strip_accents(text)
    if collapse_spaces:
        text = _SPACES.sub(" ", text).strip()
    return text


def split_words(text: str, pattern: str = LM_TOKENS) -> list[str]:
    """Every match of ``pattern`` in ``text``, in order (the pattern's first group if it has one)."""
    return re.findall(pattern, text)


def _ends_with_abbreviation(chunk: str) -> bool:
    words = chunk.split()
    if not words:
        return False
    last = words[-1].rstrip(".!?'\")]").lstrip("('\"[").lower()
    # A single letter before the dot is an initial ("J. Smith"), a known short form is an abbreviation.
    return last in ABBREVIATIONS or (len(last) == 1 and last.isalpha())


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, each with its white space collapsed; empty ones are dropped."""
    sentences = []
    for paragraph in _BLANK_LINE.split(text):
        start = 0
        for m in _END.finditer(paragraph):
            chunk = paragraph[start:m.end()]
            if m.group().startswith(".") and len(m.group().rstrip("'\")]")) == 1 and _ends_with_abbreviation(chunk):
                continue
            sentences.append(chunk)
            start = m.end()
        sentences.append(paragraph[start:])
    return [s for s in (_SPACES.sub(" ", s).strip() for s in sentences) if s]


def tokenize_sentences(text: str) -> list[list[str]]:
    """The language model's view of a text: sentences of normalised (NFKC, lower-case) ``LM_TOKENS``."""
    return [split_words(normalize(s)) for s in split_sentences(text)]
