"""Stop words: the English function words that carry little topic on their own.

Written for llmlab from the closed word classes of English grammar (articles, pronouns, auxiliary and modal
verbs, prepositions, conjunctions, common adverbs of degree and place), in lower case, without apostrophes
(``split_words`` keeps "don" and "t" apart). Removing them shrinks a bag-of-words vocabulary; whether it helps
a classifier is measured, not assumed (README, Classic NLP).
"""

from __future__ import annotations

_WORDS = """
a an the this that these those
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves one ones someone something anyone anything
everyone everything nobody nothing who whom whose which what whatever whichever
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought
and or but nor so yet if then else than because while whereas although though unless until since as
of in on at by for with about against between into through during before after above below to from up down
out off over under again further once per via onto upon within without among across along around behind
beyond toward towards
here there where when why how all any both each few more most other some such no not only own same too very
also just now ever never always often still already even however thus hence therefore otherwise instead
s t d ll m re ve don doesn didn isn aren wasn weren hasn haven hadn won wouldn shouldn couldn mustn
"""
ENGLISH_STOP_WORDS = frozenset(_WORDS.split())


def remove_stop_words(words: list[str], stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> list[str]:
    """``words`` without the stop words (compared in lower case)."""
    return [w for w in words if w.lower() not in stop_words]
