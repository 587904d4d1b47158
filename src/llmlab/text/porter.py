"""The Porter stemmer: strip English suffixes in five steps so that "connect", "connected", "connection" and
"connections" share the stem "connect".

Paper: M. F. Porter, "An algorithm for suffix stripping", Program 14(3), 130-137, 1980. A word is read as
``[C](VC){m}[V]`` (runs of consonants C and vowels V; "y" after a consonant is a vowel) and ``m``, its
*measure*, guards each rule: a suffix comes off only when enough of the word is left. Within each step's list,
the rule with the longest matching suffix decides, whether or not its condition holds (the paper's rule).

``porter_stem(word)`` gives the same stems as NLTK's default ``PorterStemmer()`` (mode NLTK_EXTENSIONS;
tested on every distinct word of the built-in task's docstrings). That mode departs from the paper in these
places, which ``extensions=True`` (the default) follows and ``extensions=False`` (the 1980 paper exactly, NLTK's
ORIGINAL_ALGORITHM) does not:

1. words of one or two letters are returned as they are (both modes lower-case the word first);
2. a few irregular forms map directly: sky/skies -> sky, dying -> die, lying -> lie, tying -> tie, news,
   innings -> inning, outings -> outing, cannings -> canning, howe, proceed, exceed, succeed;
3. step 1a: "ies" -> "ie" in a four-letter word ("ties" -> "tie"); step 1b: "ied" -> "ie" in a four-letter
   word, else "i", before any other step 1b rule;
4. step 1c: "y" -> "i" only after a consonant that is not the word's first letter ("happy" -> "happi", "enjoy",
   "sky" unchanged) instead of "after any vowel in the stem";
5. step 2: "bli" -> "ble" replaces "abli" -> "able"; "alli" -> "al" is tried first and step 2 runs again on the
   result; "fulli" -> "ful"; "logi" -> "log" when the measure of the word less "ogi" is positive
   (rules from Porter's later published C version and NLTK's own);
6. condition *o (ends consonant-vowel-consonant) also holds for a two-letter word vowel-consonant ("ow").
"""

from __future__ import annotations

from collections.abc import Callable

VOWELS = frozenset("aeiou")
IRREGULAR = {"sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
             "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
             "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
             "exceed": "exceed", "succeed": "succeed"}

Condition = Callable[[str], bool]


def consonant_flags(word: str) -> list[bool]:
    """True where ``word[i]`` is a consonant: not a, e, i, o, u, and not a "y" that follows a consonant."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in VOWELS and not (ch == "y" and i > 0 and flags[i - 1]))
    return flags


def measure(stem: str) -> int:
    """m in ``[C](VC){m}[V]``: how many vowel-run -> consonant-run transitions the stem has."""
    flags = consonant_flags(stem)
    return sum(1 for a, b in zip(flags, flags[1:]) if not a and b)


def has_vowel(stem: str) -> bool:  # condition *v*
    return not all(consonant_flags(stem))


def ends_double_consonant(word: str) -> bool:  # condition *d
    return len(word) >= 2 and word[-1] == word[-2] and consonant_flags(word)[-1]


def ends_cvc(word: str, extensions: bool) -> bool:  # condition *o
    flags = consonant_flags(word)
    if len(word) >= 3:
        return flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy"
    return extensions and len(word) == 2 and not flags[0] and flags[1]


def _m_over(k: int) -> Condition:
    return lambda stem: measure(stem) > k


def apply_longest(word: str, rules: list[tuple[str, str, Condition]]) -> str:
    """Replace the longest matching suffix if its condition holds on what is left; otherwise leave the word."""
    for suffix, replacement, condition in sorted(rules, key=lambda r: -len(r[0])):
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem) else word
    return word


def _always(stem: str) -> bool:
    return True


def step1a(word: str, extensions: bool) -> str:
    if extensions and len(word) == 4 and word.endswith("ies"):
        return word[:-1]  # ties -> tie
    return apply_longest(word, [("sses", "ss", _always), ("ies", "i", _always), ("ss", "ss", _always),
                                ("s", "", _always)])


def step1b(word: str, extensions: bool) -> str:
    if extensions and word.endswith("ied"):
        return word[:-1] if len(word) == 4 else word[:-2]  # tied -> tie, cried -> cri
    if word.endswith("eed"):
        return word[:-1] if measure(word[:-3]) > 0 else word  # agreed -> agree; feed stays
    for suffix in ("ed", "ing"):
        stem = word[: len(word) - len(suffix)]
        if word.endswith(suffix) and has_vowel(stem):
            break
    else:
        return word
    # The suffix came off: tidy the stem so that later steps see -ate, -ble, -ize and single consonants.
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"  # conflat(ed) -> conflate
    if ends_double_consonant(stem):
        return stem if stem[-1] in "lsz" else stem[:-1]  # hopp(ing) -> hop; fall(ing) stays
    if measure(stem) == 1 and ends_cvc(stem, extensions):
        return stem + "e"  # fil(ing) -> file
    return stem


def step1c(word: str, extensions: bool) -> str:
    if not word.endswith("y"):
        return word
    stem = word[:-1]
    ok = len(stem) > 1 and consonant_flags(stem)[-1] if extensions else has_vowel(stem)
    return stem + "i" if ok else word


STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
         ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
         ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"),
         ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")]
STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
         ("ness", "")]
STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ou", "ism", "ate",
         "iti", "ous", "ive", "ize"]


def step2(word: str, extensions: bool) -> str:
    m0 = _m_over(0)
    if extensions and word.endswith("alli") and measure(word[:-4]) > 0:
        return step2(word[:-2], extensions)  # radicalli -> radical, then step 2 again
    rules = [(s, r, m0) for s, r in STEP2]
    if extensions:
        rules += [("bli", "ble", m0), ("fulli", "ful", m0),
                  ("logi", "log", lambda stem: measure(stem + "l") > 0)]
    else:
        rules.append(("abli", "able", m0))
    return apply_longest(word, rules)


def step3(word: str) -> str:
    return apply_longest(word, [(s, r, _m_over(0)) for s, r in STEP3])


def step4(word: str) -> str:
    m1 = _m_over(1)
    rules = [(s, "", m1) for s in STEP4]
    rules.append(("ion", "", lambda stem: measure(stem) > 1 and stem[-1:] in ("s", "t")))
    return apply_longest(word, rules)


def step5(word: str, extensions: bool) -> str:
    if word.endswith("e"):
        m = measure(word[:-1])
        if m > 1 or (m == 1 and not ends_cvc(word[:-1], extensions)):
            word = word[:-1]  # probate -> probat; rate stays
    if word.endswith("ll") and measure(word[:-1]) > 1:
        word = word[:-1]  # controll -> control
    return word


def porter_stem(word: str, extensions: bool = True) -> str:
    """The Porter stem of one word (``extensions``: NLTK's default mode; False: the 1980 paper)."""
    word = word.lower()
    if extensions and word in IRREGULAR:
        return IRREGULAR[word]
    if extensions and len(word) <= 2:
        return word
    word = step1a(word, extensions)
    word = step1b(word, extensions)
    word = step1c(word, extensions)
    word = step2(word, extensions)
    word = step3(word)
    word = step4(word)
    return step5(word, extensions)


class PorterStemmer:
    """``stem(word)`` with a cache: a corpus repeats its words, and the five steps are pure Python."""

    def __init__(self, extensions: bool = True) -> None:
        self.extensions = extensions
        self._cache: dict[str, str] = {}

    def stem(self, word: str) -> str:
        out = self._cache.get(word)
        if out is None:
            out = self._cache[word] = porter_stem(word, self.extensions)
        return out
