"""Tokenizer and chat template from a model or engine directory (tokenizer.json + tokenizer_config.json)."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ModelError


class TextTokenizer:
    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{path}: missing (the tokenizer is needed to encode prompts)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
            raise ModelError(f"{path}: not a valid tokenizers file ({e})") from None
        cfg_path = d / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise ModelError("this tokenizer has no chat_template in tokenizer_config.json; drop --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        specials = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True, **specials)

    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """A plain string, a string wrapped as one user turn (chat=True), or a list of chat messages."""
        if isinstance(prompt, list):
            return self.encode(self.render_chat(prompt))
        if chat:
            return self.encode(self.render_chat([{"role": "user", "content": prompt}]))
        return self.encode(prompt)
