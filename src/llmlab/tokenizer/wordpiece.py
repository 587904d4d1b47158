"""WordPiece, BERT's tokenizer (Schuster & Nakajima 2012; Wu et al. 2016, arXiv:1609.08144).

Normalise (clean control chars, lower-case, strip accents, put spaces around CJK characters) ->
split on whitespace and punctuation -> greedy longest-match-first into vocabulary pieces, where
pieces after the first start with ``##``; a word with no match (or longer than 100 chars) is [UNK].
Special tokens written in the text ("[SEP]") stay atomic. ``encode(..., add_special=True)`` wraps
the sequence as [CLS] ... [SEP]. ``encode_offsets`` also gives each token's (start, end) characters in the
original text, as Hugging Face tokenizers' ``offset_mapping`` (extractive QA maps predicted token spans back to
text through them).
"""

from __future__ import annotations

import unicodedata

import regex


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    # BERT counts all non-letter/number ASCII as punctuation ("$", "^", "`" included).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co", "Cs")  # HF also drops unassigned/private


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class WordPiece:
    def __init__(self, vocab: dict[str, int], *, unk_token: str = "[UNK]", prefix: str = "##",
                 max_chars: int = 100, lowercase: bool = True, strip_accents: bool | None = None,
                 clean_text: bool = True, cjk: bool = True, special_tokens: dict[str, int] | None = None,
                 cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_token: str = "[PAD]"):
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.unk_token, self.prefix, self.max_chars = unk_token, prefix, max_chars
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.clean_text, self.cjk = clean_text, cjk
        self.special_tokens = dict(special_tokens or {})
        self.special_ids = set(self.special_tokens.values())
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
        self.cls_id, self.sep_id = vocab.get(cls_token), vocab.get(sep_token)
        self.pad_id = vocab.get(pad_token, 0)
        self.bos_id, self.eos_id = self.cls_id, self.sep_id

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1

    def normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if self.clean_text:
                if cp == 0 or cp == 0xFFFD or _is_control(ch):
                    continue
                if _is_whitespace(ch):
                    ch = " "
            if self.cjk and _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            text = text.lower()
        return text

    def pre_split(self, text: str) -> list[str]:
        words = []
        for chunk in text.split():
            word = []
            for ch in chunk:
                if _is_punct(ch):
                    if word:
                        words.append("".join(word))
                        word = []
                    words.append(ch)
                else:
                    word.append(ch)
            if word:
                words.append("".join(word))
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.vocab[self.unk_token]]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.vocab[self.unk_token]]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, add_special: bool = False, allow_special: bool = True) -> list[int]:
        chunks = [(text, False)]
        if allow_special and self._special_re is not None:
            chunks, pos = [], 0
            for m in self._special_re.finditer(text):
                chunks += [(text[pos:m.start()], False), (m.group(), True)]
                pos = m.end()
            chunks.append((text[pos:], False))
        ids: list[int] = []
        for chunk, is_special in chunks:
            if is_special:
                ids.append(self.special_tokens[chunk])
            else:
                for word in self.pre_split(self.normalize(chunk)):
                    ids.extend(self._wordpiece(word))
        return [self.cls_id, *ids, self.sep_id] if add_special else ids

    encode_reference = encode

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no [CLS]/[SEP]; special-token strings are plain text here) and each token's
        (start, end) character span in ``text``. Normalisation runs one character at a time, so every
        normalised character remembers the original one it came from (an accent stripped, a letter whose
        lower case is two characters: both map back to that letter)."""
        norm: list[str] = []
        src: list[int] = []  # original index of each normalised character
        for i, ch in enumerate(text):
            piece = self.normalize(ch)
            norm.extend(piece)
            src.extend([i] * len(piece))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos, n = 0, len(norm)
        while pos < n:
            if norm[pos] == " ":
                pos += 1
                continue
            end = pos
            while end < n and norm[end] != " ":
                end += 1
            start = pos
            for word in self.pre_split("".join(norm[pos:end])):  # pre_split keeps every non-space character
                w_end = start + len(word)
                pieces = self._wordpiece(word)
                if pieces == [self.vocab[self.unk_token]]:
                    ids.append(pieces[0])
                    offsets.append((src[start], src[w_end - 1] + 1))
                else:
                    p = start
                    for tid in pieces:
                        tok = self.id_to_token[tid]
                        length = len(tok) - (len(self.prefix) if p > start else 0)
                        ids.append(tid)
                        offsets.append((src[p], src[p + length - 1] + 1))
                        p += length
                start = w_end
            pos = end
        return ids, offsets

    def decode(self, ids, skip_special: bool = False) -> str:
        """As HF's WordPiece decoder: "##" pieces glue on, other tokens get a leading space, and the
        "cleanup" rules apply to each token on its own (so " ." -> "." but "it ' s" stays)."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special and i in self.special_ids:
                continue
            tok = self.id_to_token[i]
            if tok.startswith(self.prefix):
                piece = tok[len(self.prefix):]
            else:
                piece = tok if not out else " " + tok
            for a, b in _CLEANUP:
                piece = piece.replace(a, b)
            out.append(piece)
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        tok = self.id_to_token[int(token_id)]
        return (tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok).encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)
