"""A picture of decoding: at each greedy step, the top candidate tokens and their probabilities; and
the beam-search tree (which beams survive, which finish). Written as PNG figures (matplotlib) and one
self-contained HTML page (figures inlined as data URIs, no network needed to view it).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import save_png, write_text_atomic
from llmlab.infer.beam import beam_search


@dataclass
class Exploration:
    prompt: str
    steps: list[dict] = field(default_factory=list)  # {"chosen": str, "candidates": [(token, prob)]}
    beam_trace: list[dict] = field(default_factory=list)
    beams: list[tuple[str, float]] = field(default_factory=list)  # final hypotheses (text, score)
    token_text: dict[int, str] = field(default_factory=dict)


@torch.inference_mode()
def explore(model, tokenizer, prompt_ids: list[int], prompt: str, steps: int = 12, top: int = 8,
            num_beams: int = 3, stop_ids: set[int] | None = None) -> Exploration:
    ex = Exploration(prompt)
    cache = model.new_cache(1, len(prompt_ids) + steps)
    logits = model(torch.tensor([prompt_ids]), cache=cache)[0, -1]
    for _ in range(steps):
        probs = logits.float().softmax(-1)
        p, idx = probs.topk(top)
        cands = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(p, idx)]
        chosen = int(idx[0])
        ex.steps.append({"chosen": cands[0][0], "candidates": cands})
        if stop_ids and chosen in stop_ids:
            break
        logits = model(torch.tensor([[chosen]]), cache=cache)[0, -1]
    trace: list[dict] = []
    finals = beam_search(model, prompt_ids, steps, num_beams, eos_ids=stop_ids, num_return=num_beams, trace=trace)
    ex.beam_trace = trace
    ex.beams = [(tokenizer.decode(b.ids, skip_special=True), b.score) for b in finals]
    for step in trace:
        for _, tok, _ in step["live"] + step["finished"]:
            ex.token_text.setdefault(tok, tokenizer.decode([tok]))
    return ex


def _show(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t") or "∅"


def plot_steps(ex: Exploration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, top = len(ex.steps), max(len(s["candidates"]) for s in ex.steps)
    fig, ax = plt.subplots(figsize=(1.6 + 1.35 * n, 0.9 + 0.45 * top))
    cmap = plt.get_cmap("Blues")
    for x, step in enumerate(ex.steps):
        for y, (tok, prob) in enumerate(step["candidates"]):
            ax.add_patch(plt.Rectangle((x, -y - 1), 0.95, 0.9, color=cmap(0.15 + 0.85 * prob),
                                       ec="crimson" if y == 0 else "none", lw=2))
            ax.text(x + 0.475, -y - 0.45, f"{_show(tok)[:10]}\n{prob:.2f}", ha="center", va="center",
                    fontsize=7, color="white" if prob > 0.5 else "black")
    ax.set_xlim(0, n)
    ax.set_ylim(-top - 0.1, 0)
    ax.set_xticks([i + 0.475 for i in range(n)], [str(i + 1) for i in range(n)])
    ax.set_yticks([])
    ax.set_xlabel("decoding step (greedy path outlined in red)")
    ax.set_title(f"Top-{top} next-token probabilities", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def plot_beams(ex: Exploration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ex.beam_trace)
    width = max((len(s["live"]) + len(s["finished"]) for s in ex.beam_trace), default=1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * n, 1.2 + 0.8 * width))
    prev_y = {0: 0.0}
    for t, step in enumerate(ex.beam_trace):
        ys = {}
        for j, (parent, tok, score) in enumerate(step["live"]):
            y = -float(j)
            ax.plot([t, t + 1], [prev_y.get(parent, 0.0), y], color="steelblue", lw=1)
            ax.text(t + 1, y, f"{_show(ex.token_text[tok])[:10]}\n{score:.1f}", fontsize=7, ha="center",
                    va="center", bbox={"boxstyle": "round", "fc": "white", "ec": "steelblue"})
            ys[j] = y
        for k, (parent, tok, score) in enumerate(step["finished"]):
            y = -float(len(step["live"]) + k)
            ax.plot([t, t + 1], [prev_y.get(parent, 0.0), y], color="seagreen", lw=1, ls="--")
            ax.text(t + 1, y, f"{_show(ex.token_text[tok])[:10]} ■\n{score:.1f}", fontsize=7, ha="center",
                    va="center", bbox={"boxstyle": "round", "fc": "honeydew", "ec": "seagreen"})
        prev_y = ys
    ax.text(0, 0, "prompt", fontsize=8, ha="center", va="center", bbox={"boxstyle": "round", "fc": "lightyellow"})
    ax.set_xlim(-0.6, n + 0.6)
    ax.set_ylim(-width + 0.4, 0.6)
    ax.axis("off")
    ax.set_title("Beam search: live beams (blue, summed log-prob) and finished hypotheses (green)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(ex: Exploration, out: Path) -> dict[str, Path]:
    """steps.png, beams.png, exploration.json and index.html (self-contained) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"steps": out / "steps.png", "beams": out / "beams.png", "json": out / "exploration.json",
             "html": out / "index.html"}
    plot_steps(ex, paths["steps"])
    plot_beams(ex, paths["beams"])
    write_text_atomic(paths["json"], json.dumps({"prompt": ex.prompt, "steps": ex.steps, "beam_trace": ex.beam_trace,
                                                 "beams": ex.beams}, ensure_ascii=False, indent=1))
    rows = []
    for i, step in enumerate(ex.steps, 1):
        cells = "".join(
            f'<td class="{"chosen" if j == 0 else ""}"><div class="bar" style="width:{100 * p:.0f}%"></div>'
            f"<code>{html.escape(_show(tok))}</code> {p:.3f}</td>" for j, (tok, p) in enumerate(step["candidates"]))
        rows.append(f"<tr><th>{i}</th>{cells}</tr>")
    greedy = html.escape("".join(s["chosen"] for s in ex.steps))
    beams = "".join(f"<li><code>{html.escape(t)}</code> <small>score {s:.3f}</small></li>" for t, s in ex.beams)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>llmlab explore</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:4px;position:relative;min-width:80px}} td.chosen{{outline:2px solid crimson}}
.bar{{position:absolute;left:0;top:0;bottom:0;background:#cfe3f7;z-index:-1}} code{{white-space:pre}}
img{{max-width:100%;border:1px solid #eee}}</style></head><body>
<h1>Decoding, step by step</h1><p><b>Prompt:</b> <code>{html.escape(ex.prompt)}</code></p>
<p><b>Greedy continuation:</b> <code>{greedy}</code></p>
<h2>Top candidates per step</h2><table><tr><th>step</th><th colspan="{len(ex.steps[0]["candidates"])}">
candidates (probability)</th></tr>{"".join(rows)}</table>
<p><img alt="top candidates per step" src="{_data_uri(paths["steps"])}"></p>
<h2>Beam search</h2><ol>{beams}</ol><p><img alt="beam search tree" src="{_data_uri(paths["beams"])}"></p>
</body></html>"""
    write_text_atomic(paths["html"], page)
    return paths
