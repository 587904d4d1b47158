"""A multi-turn conversation: the history rendered with the model's chat template, trimmed from the
oldest turns so the prompt plus the reply budget fits the context window."""

from __future__ import annotations

from collections.abc import Callable


class ChatSession:
    def __init__(self, llm, system: str | None = None, max_new_tokens: int = 512, **decode_kwargs):
        self.llm = llm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.decode_kwargs = decode_kwargs
        self.history: list[dict] = []

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
        reply = self.llm.generate(self.prompt(), self.max_new_tokens, raw=True, on_text=on_text, **kwargs)
        self.history.append({"role": "assistant", "content": reply})
        return reply
