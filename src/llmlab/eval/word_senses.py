"""Do contextual word vectors tell two senses of one word apart? ELMo's claim (Peters et al. 2018,
arXiv:1802.05365, section 5.3: the biLM's vectors of "play" as a sport and as a performance sit apart, which
a static embedding cannot do), measured on a built-in set in the corpus' own register: ten words that the
Python documentation uses in two senses ("return" a value / the return value, a ``set`` / to set, the
arithmetic ``mean`` / to mean, the ``second`` argument / one second, a ``match`` object / to match, ...), five
hand-written documentation-style sentences per sense, the word marked ``[like this]``.

For every word, layer j and use a, with b a use of the same sense and c one of the other sense (cosine sim):

    accuracy_j = mean over (a, b, c) of [sim(v_a, v_b) > sim(v_a, v_c)] (+ 1/2 for a tie)     (chance: 0.5)
    gap_j      = mean sim over same-sense pairs - mean sim over cross-sense pairs

A use's vector is the mean of the layer states over the word's tokens. Layer 0 is the token embedding: the
tokenizer splits the word the same way in every sentence (byte-level BPE pre-tokenizes at word boundaries), so
its vectors are identical and its accuracy is exactly 0.5 and its gap 0: the static baseline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmlab.common import LlmlabError, save_png
from llmlab.models.lstm_lm import RecurrentLM, ScalarMix
from llmlab.text.vector_eval import project_2d

# word -> (sense name, sentences) x 2
SENSES: dict[str, tuple[tuple[str, list[str]], tuple[str, list[str]]]] = {
    "return": (("verb", ["This method will [return] the number of bytes written.",
                         "The function should [return] None when the key is missing.",
                         "It does not [return] until the thread has finished.",
                         "Both calls [return] a new list of names.",
                         "A generator may [return] early when the input is empty."]),
               ("noun", ["The [return] value is a tuple of two integers.",
                         "Check the [return] code of the child process.",
                         "The annotation gives the [return] type of the function.",
                         "A bare [return] statement exits the function.",
                         "The [return] values of both calls are ignored."])),
    "set": (("type", ["The result is a [set] of strings.",
                      "Convert the list to a [set] to remove duplicates.",
                      "Return a new [set] with the elements of both.",
                      "Membership tests on a [set] are fast.",
                      "The keys view behaves like a [set] of keys."]),
            ("verb", ["Use this method to [set] the value of the attribute.",
                      "You can [set] the timeout to None.",
                      "Call setattr() to [set] an attribute by name.",
                      "The variable is used to [set] the default encoding.",
                      "Do not [set] this flag unless you know why."])),
    "list": (("noun", ["Return a [list] of all the names in the module.",
                       "The arguments are passed as a [list] of strings.",
                       "Append the item to the end of the [list] and return it.",
                       "The [list] is sorted in place.",
                       "An empty [list] is false in a boolean context."]),
             ("verb", ["The command will [list] the contents of the directory.",
                       "Use dir() to [list] the attributes of an object.",
                       "This option tells the runner to [list] all available tests.",
                       "The module can [list] the members of a tar archive.",
                       "We only [list] the files that changed."])),
    "open": (("verb", ["Use the builtin function to [open] the file for reading.",
                       "The browser will [open] the page in a new tab.",
                       "Call connect() to [open] a connection to the server.",
                       "We [open] the database in read-only mode.",
                       "Failing to [open] the file raises an OSError."]),
             ("adjective", ["Raise an error if the file is still [open] when the object is deleted.",
                            "The connection stays [open] until close() is called.",
                            "Only [open] sockets can be read from.",
                            "Keep the stream [open] for the next request.",
                            "The file is left [open] after the call."])),
    "mean": (("average", ["Return the arithmetic [mean] of the data.",
                          "The sample [mean] is computed in one pass.",
                          "Compute the [mean] and the standard deviation.",
                          "The geometric [mean] of the numbers is returned.",
                          "The harmonic [mean] is the reciprocal of the average of the reciprocals."]),
             ("verb", ["This does not [mean] that the file was deleted.",
                       "What do you [mean] by that option?",
                       "A zero exit status is taken to [mean] success.",
                       "These flags [mean] different things on Windows.",
                       "It would [mean] copying the whole buffer."])),
    "second": (("ordinal", ["The [second] argument is the default value.",
                            "The [second] element of the tuple is the count.",
                            "Skip the first line and read the [second] one.",
                            "The [second] call returns the cached result.",
                            "A [second] pass over the data is not needed."]),
               ("time", ["Sleep for one [second] before trying again.",
                         "The delay may be a fraction of a [second].",
                         "The clock ticks once per [second].",
                         "Wait at most a [second] for the lock.",
                         "The counter is updated every [second]."])),
    "call": (("noun", ["Each function [call] pushes a new frame.",
                       "The [call] to open() failed.",
                       "A system [call] was interrupted by a signal.",
                       "The result of the last [call] is cached.",
                       "The [call] returns immediately."]),
             ("verb", ["You must [call] close() when you are done.",
                       "Do not [call] this method directly.",
                       "It is safe to [call] this function from several threads.",
                       "The loop will [call] the callback later.",
                       "Subclasses should [call] the base class method."])),
    "match": (("noun", ["If there is no [match], None is returned.",
                        "The [match] object has a group() method.",
                        "Return the first [match] in the string.",
                        "A successful [match] returns a Match instance.",
                        "The span of the [match] is a pair of indices."]),
              ("verb", ["The pattern must [match] the whole string.",
                        "Names that [match] the filter are skipped.",
                        "The types of the arguments must [match] the signature.",
                        "Use fnmatch to [match] file names against a pattern.",
                        "If the checksums do not [match], an error is raised."])),
    "block": (("noun", ["Each [block] of code is indented.",
                        "The [block] size is 4096 bytes.",
                        "Read the next [block] of data from the file.",
                        "The finally [block] always runs.",
                        "A [block] of memory is allocated for the buffer."]),
              ("verb", ["The call will [block] until data is available.",
                        "If the queue is full, put() may [block].",
                        "Set blocking to False so that the socket does not [block].",
                        "The acquire() method will [block] until the lock is released.",
                        "Reading from the pipe can [block] forever."])),
    "record": (("noun", ["The log [record] holds the message and the level.",
                         "Each [record] in the file has three fields.",
                         "A handler formats the [record] before writing it.",
                         "The [record] is passed to every filter.",
                         "Read one [record] from the CSV file."]),
               ("verb", ["The profiler will [record] the time of each call.",
                         "Use this hook to [record] events for later.",
                         "The tracer can [record] every line executed.",
                         "We [record] the exit status of the child process.",
                         "Warnings can be used to [record] deprecated calls."])),
}


def marked(sentence: str) -> tuple[str, int, int]:
    """'a [word] b' -> ('a word b', start, end) of the word."""
    m = re.search(r"\[([^\]]+)\]", sentence)
    if m is None:
        raise LlmlabError(f"no [word] marked in {sentence!r}")
    text = sentence[:m.start()] + m.group(1) + sentence[m.end():]
    return text, m.start(), m.start() + len(m.group(1))


def word_token_span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], int, int]:
    """Token ids of ``text`` and the span [i, j) of the tokens that overlap the characters [start, end)."""
    ids = tokenizer.encode(text)
    offsets, pos = [], 0
    for i in ids:
        piece = tokenizer.decode([i])
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    if pos != len(text):
        raise LlmlabError(f"cannot align the tokens of {text!r} with its characters (non-ASCII text?)")
    inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
    return ids, inside[0], inside[-1] + 1


@torch.no_grad()
def use_vectors(model: RecurrentLM, tokenizer, senses=None) -> tuple[torch.Tensor, list[tuple[str, int, str]]]:
    """(n uses, L+1, D) layer vectors of every marked use (mean over the word's tokens), and (word, sense index,
    text) per use. All sentences run as one right-padded batch."""
    model.eval()
    rows, labels = [], []
    for word, pair in (senses or SENSES).items():
        for sense, (_, sentences) in enumerate(pair):
            for sentence in sentences:
                text, start, end = marked(sentence)
                rows.append(word_token_span(tokenizer, text, start, end))
                labels.append((word, sense, text))
    lengths = torch.tensor([len(ids) for ids, _, _ in rows])
    batch = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # (n, T), padded with id 0
    for r, (ids, _, _) in enumerate(rows):
        batch[r, :len(ids)] = torch.tensor(ids)
    states = model.layer_states(batch, lengths)  # (L+1, n, T, D)
    vectors = [states[:, r, i:j].mean(1) for r, (_, i, j) in enumerate(rows)]  # (L+1, D) each
    return torch.stack(vectors), labels


def separation(v: torch.Tensor, senses: list[int]) -> tuple[float, float]:
    """Triplet accuracy (ties count 1/2) and same-minus-cross mean cosine of the uses of one word. v (n, D)."""
    u = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (u @ u.T).double()  # (n, n)
    s = torch.tensor(senses)
    same = s[:, None] == s[None, :]
    eye = torch.eye(len(s), dtype=torch.bool)
    wins, total = 0.0, 0
    for a in range(len(s)):
        pos = sim[a][same[a] & ~eye[a]]  # (p,)
        neg = sim[a][~same[a]]  # (q,)
        diff = pos[:, None] - neg[None, :]  # (p, q)
        # a tie (equal up to rounding: identical vectors) counts one half
        tie = diff.abs() <= 1e-9
        wins += float(((diff > 0) & ~tie).sum() + 0.5 * tie.sum())
        total += diff.numel()
    gap = float(sim[same & ~eye].mean() - sim[~same].mean())
    return wins / total, gap


@torch.no_grad()
def evaluate(model: RecurrentLM, tokenizer, senses=None) -> dict:
    """Per layer (0 = static embedding, 1..L, and ELMo's mix with s uniform, gamma 1): mean accuracy and gap over
    the words, and per word."""
    senses = senses or SENSES
    vectors, labels = use_vectors(model, tokenizer, senses)  # (n, L+1, D)
    mixed = ScalarMix(vectors.shape[1])(vectors.transpose(0, 1))  # (n, D)
    views = {f"layer {j}": vectors[:, j] for j in range(vectors.shape[1])}
    views["ELMo mix"] = mixed
    out: dict = {"layers": {}, "words": list(senses)}
    for name, v in views.items():
        per_word = {}
        for word in senses:
            rows = [k for k, lab in enumerate(labels) if lab[0] == word]
            per_word[word] = separation(v[rows], [labels[k][1] for k in rows])
        out["layers"][name] = {"accuracy": sum(a for a, _ in per_word.values()) / len(per_word),
                               "gap": sum(g for _, g in per_word.values()) / len(per_word),
                               "per_word": {w: {"accuracy": a, "gap": g} for w, (a, g) in per_word.items()}}
    out["_vectors"], out["_labels"] = mixed, labels
    return out


def plot(result: dict, senses, path: str | Path) -> Path:
    """One panel per word: the PCA of its uses' ELMo-mix vectors, the two senses in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    words = list(senses)
    cols = 5
    rows = (len(words) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    vectors, labels = result["_vectors"], result["_labels"]
    for ax, word in zip(axes.flat, words):
        idx = [k for k, lab in enumerate(labels) if lab[0] == word]
        xy = project_2d(vectors[idx])  # (n, 2)
        for sense, (name, _), color, marker in zip((0, 1), senses[word], ("tab:blue", "tab:orange"), ("o", "s")):
            pts = xy[[k for k, i in enumerate(idx) if labels[i][1] == sense]]
            ax.scatter(pts[:, 0], pts[:, 1], c=color, marker=marker, s=28, label=name)
        acc = result["layers"]["ELMo mix"]["per_word"][word]["accuracy"]
        ax.set_title(f'"{word}": {100 * acc:.0f}% (static: 50%)', fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(words):]:
        ax.axis("off")
    fig.suptitle("ELMo vectors (uniform layer mix) of each word's uses, PCA per word; title: same-sense-closer "
                 "accuracy", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.86, wspace=0.08, hspace=0.25)
    return save_png(fig, path)


def report(result: dict) -> str:
    """The table printed by ``llmlab elmo senses``."""
    lines = [f"{'vectors':<16} {'accuracy':>9} {'gap':>8}   (same-sense closer than cross-sense; chance 50%)"]
    for name, r in result["layers"].items():
        label = "layer 0 (static)" if name == "layer 0" else name
        lines.append(f"{label:<16} {100 * r['accuracy']:>8.1f}% {r['gap']:>8.3f}")
    mix = result["layers"]["ELMo mix"]["per_word"]
    lines.append("per word (ELMo mix): " + ", ".join(f"{w} {100 * r['accuracy']:.0f}%" for w, r in mix.items()))
    return "\n".join(lines)
