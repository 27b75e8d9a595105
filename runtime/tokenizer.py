"""Tokenizer and chat template from a model or engine directory (tokenizer.json + tokenizer_config.json).

Text typed by a user (a plain prompt, a message's content or role) never becomes special tokens: only the chat
template's own markup may produce them. The template is rendered with a sentinel in place of each user string;
the rendered text is then encoded with special tokens recognised in the template's segments only."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from .config import ModelError
from .paths import inside


class ChatTemplateError(ValueError):
    """The chat template refused the messages (raise_exception, or an error while rendering)."""


def _read_config(d: Path) -> dict:
    path = inside(d, "tokenizer_config.json", "tokenizer config")
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: must be a JSON object, got {type(cfg).__name__}")
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return cfg


def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def _checked(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


class TextTokenizer:
    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        d = Path(directory)
        path = inside(d, "tokenizer.json", "tokenizer")
        if not path.is_file():
            raise ModelError(f"{path}: missing (the tokenizer is needed to encode prompts)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            self._plain = Tokenizer.from_file(str(path))  # a second copy: toggling one flag is not thread-safe
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
            raise ModelError(f"{path}: not a valid tokenizers file ({e})") from None
        self._plain.encode_special_tokens = True  # special-token text is split like any other text
        self.config = _read_config(d)
        self.chat_template = self.config.get("chat_template")
        self._template = self._compile(d) if self.chat_template else None
        specials = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        # longest first, so that a special token that is a prefix of another never wins
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def _compile(self, d: Path):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise ModelError(f"{d / 'tokenizer_config.json'}: chat_template does not compile ({e})") from None

    def encode(self, text: str) -> list[int]:
        """User text: special-token spellings in it are encoded as ordinary text."""
        return self._plain.encode(_checked(text), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _specials_for_template(self) -> dict:
        out = {}
        for k, v in self.config.items():
            if isinstance(v, dict):  # older configs: {"content": "<s>", ...}
                v = v.get("content")
            if k.endswith("_token") and isinstance(v, str):
                out[k] = v
        return out

    def _render(self, messages: list[dict]) -> str:
        if self._template is None:
            raise ModelError("this tokenizer has no chat_template in tokenizer_config.json; drop --chat")
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._specials_for_template())
        except ChatTemplateError:
            raise
        except RecursionError:
            raise ChatTemplateError("chat template: recursion too deep") from None
        except Exception as e:  # a template is code: jinja errors, TypeErrors, sandbox refusals
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def render_chat(self, messages: list[dict]) -> str:
        return self._render(self._check_messages(messages))

    @staticmethod
    def _check_messages(messages) -> list[dict]:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("chat messages must be a list of objects")
        for m in messages:
            for v in m.values():
                if isinstance(v, str):
                    _checked(v)
        return messages

    def encode_chat(self, messages: list[dict]) -> list[int]:
        messages = self._check_messages(messages)
        truth = self._render(messages)
        nonce = uuid.uuid4().hex
        # A sentinel keeps the user string's outer whitespace, so that `| trim` and friends act on it as on the
        # string; whitespace-only strings are passed as they are (whitespace cannot spell a special token).
        users, masked = [], []
        for m in messages:
            masked.append({})
            for k, v in m.items():
                if isinstance(v, str) and v.strip():
                    core = v.strip()
                    lead, trail = v[:len(v) - len(v.lstrip())], v[len(v.rstrip()):]
                    v = f"{lead}\ue000{nonce}:{len(users)}\ue001{trail}"
                    users.append(core)
                masked[-1][k] = v
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", self._render(masked))
        template_text, user_text = parts[0::2], [users[int(i)] for i in parts[1::2]]
        rebuilt = "".join(t + u for t, u in zip(template_text, user_text + [""]))
        if rebuilt != truth or any(nonce in u for u in users):
            return self._encode_untracked(truth, users)
        pieces: list[str | int] = []
        for t, u in zip(template_text, user_text + [""]):
            pieces.extend(self._split_specials(t))
            pieces.append(u)
        return self._encode_pieces(pieces)

    def _split_specials(self, text: str) -> list[str | int]:
        if not self._special_ids:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            out += [text[pos:m.start()], self._special_ids[m.group()]]
            pos = m.end()
        return out + [text[pos:]]

    def _encode_pieces(self, pieces: list[str | int]) -> list[int]:
        """Adjacent text pieces are joined before encoding, so merges across a template/user boundary are the
        same as when the rendered string is encoded whole."""
        ids, text = [], ""
        for p in pieces:
            if isinstance(p, int):
                ids += self.encode(text) if text else []
                ids.append(p)
                text = ""
            else:
                text += p
        return ids + (self.encode(text) if text else [])

    def _encode_untracked(self, rendered: str, users: list[str]) -> list[int]:
        """The template rewrote user strings beyond trimming, so they cannot be located in its output: allowed
        only when no user string spells a special token."""
        for u in users:
            if self._special_re.pattern and self._special_re.search(u):
                raise ChatTemplateError("message text contains special-token text that this chat template's "
                                        "rewriting of messages does not let us keep apart; remove it")
        return self._encode_pieces(self._split_specials(rendered))

    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """A plain string, a string wrapped as one user turn (chat=True), or a list of chat messages."""
        if isinstance(prompt, list):
            return self.encode_chat(prompt)
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.encode(prompt)
