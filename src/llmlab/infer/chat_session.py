"""A multi-turn conversation: the history rendered with the model's chat template, trimmed from the
oldest turns so the prompt plus the reply budget fits the context window.

A chat samples by default (``LLM.chat_sampling()``: the model file's recommended settings, else
``infer.sample.CHAT_DEFAULTS``) and ends a reply that loops (``infer.repetition.RepetitionGuard``); the
looped copies are left out of the history, so the next turn does not see the loop and continue it."""

from __future__ import annotations

from collections.abc import Callable

from llmlab.infer.repetition import RepetitionGuard

_DEFAULT_GUARD = RepetitionGuard()


class ChatSession:
    def __init__(self, llm, system: str | None = None, max_new_tokens: int = 512, *,
                 repetition_guard: RepetitionGuard | None = _DEFAULT_GUARD, **decode_kwargs):
        self.llm = llm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.repetition_guard = repetition_guard
        self.decode_kwargs = decode_kwargs
        if decode_kwargs.get("sampling") is None:
            self.decode_kwargs["sampling"] = llm.chat_sampling()
        self.history: list[dict] = []
        self.looped = False  # the last reply was ended by the repetition guard

    def reset(self) -> None:
        self.history = []

    def set_system(self, system: str | None) -> None:
        self.system = system
        self.reset()

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt(self) -> str:
        """Render, dropping the oldest user/assistant pairs until prompt + reply budget fit."""
        limit = self.llm.config.max_seq_len - min(self.max_new_tokens, self.llm.config.max_seq_len // 2)
        while True:
            text = self.llm.chat_template.render(self.messages(), add_generation_prompt=True)
            if len(self.llm.tokenizer.encode(text)) <= limit or len(self.history) <= 1:
                return text
            self.history = self.history[2:]

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        self.history.append({"role": "user", "content": text})
        kwargs = dict(self.decode_kwargs)
        kwargs.setdefault("truncate", True)  # a single over-long message keeps its end
        reply = self.llm.generate(self.prompt(), self.max_new_tokens, raw=True, on_text=on_text,
                                  repetition_guard=self.repetition_guard, **kwargs)
        self.looped = self.llm.last_finish_reasons == ["repetition"]
        kept = reply
        if self.looped:  # keep one copy of the looping phrase in the history
            ids = self.llm.tokenizer.encode(reply)
            rep = self.repetition_guard.find(ids)
            if rep is not None:
                kept = self.llm.tokenizer.decode(ids[:rep.keep], skip_special=True)
        self.history.append({"role": "assistant", "content": kept})
        return reply
