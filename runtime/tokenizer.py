"""Tokenizer and chat template from a model or engine directory (tokenizer.json + tokenizer_config.json).

Text typed by a user (a plain prompt, a message's content or role) never becomes special tokens: only the chat
template's own markup may produce them. The template is rendered with a sentinel in place of each user string;
the rendered text is then encoded with special tokens recognised in the template's segments only. The ids of
user text are checked as well: a vocabulary that also lists a control token as an ordinary word (word-level,
unigram, wordpiece, or a BPE that keeps whole words) would otherwise turn typed markup into that token.

The chat template is code from the model's folder: it runs in a sandbox with bounded time, output and value sizes
(runtime/chat_template.py).

Errors: ModelError at load (one line); ChatTemplateError, ControlTokenText and TokenizerError (ValueErrors, one
line) while encoding or decoding, so that callers can answer them as a bad request."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from .chat_template import ChatTemplateError, compile_template, first_line, render
from .config import EOT_TOKEN, ModelError, read_json
from .paths import inside


class TokenizerError(ValueError):
    """The tokenizers library failed on this text or these ids (an error or a Rust panic), in one line."""


class ControlTokenText(TokenizerError):
    """User text would encode to a control token and the tokenizer has no unknown token to put there instead."""


# A control token's spelling: <|...|>, as in <|eot_id|>, <|mdm_mask|>, <|reserved_special_token_0|>.
_CONTROL_SHAPE = re.compile(r"<\|[^|\s]+\|>")
# Marks that a vocabulary puts around a word (byte-level space, sentencepiece space, wordpiece continuation, BPE
# end of word); a token is the control token it spells once they are removed.
_WORD_MARKS = ("\u0120", "\u2581", "##", " ", "</w>")


def _read_config(d: Path) -> dict:
    path = inside(d, "tokenizer_config.json", "tokenizer config")
    if not path.exists():
        return {}
    cfg = read_json(path, "")
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return cfg


def _token_text(v) -> str | None:
    """A token named in tokenizer_config.json: a string, or a serialised AddedToken {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _named_ids(d: Path) -> dict[str, set[int]]:
    """The mask and end ids that the model's own files name next to the tokenizer (config.json,
    generation_config.json, or an engine's manifest.json). Unreadable files are left to the config loader."""
    out: dict[str, set[int]] = {"mask": set(), "end": set()}

    def ints(v) -> set[int]:
        vs = v if isinstance(v, list) else [v]
        return {i for i in vs if isinstance(i, int) and not isinstance(i, bool) and i >= 0}

    for name in ("config.json", "generation_config.json", "manifest.json"):
        try:
            raw = json.loads((d / name).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if name == "manifest.json" and isinstance(raw, dict):
            raw = raw.get("model")
        if isinstance(raw, dict):
            out["mask"] |= ints(raw.get("mask_token_id"))
            out["end"] |= ints(raw.get("eos_token_id")) | ints(raw.get("end_token_ids"))
    return out


def _checked(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


def _library(what: str, call, *args, **kwargs):
    """Call into the tokenizers library; its errors, and its Rust panics (pyo3's PanicException derives from
    BaseException, not Exception), become one TokenizerError line."""
    try:
        return call(*args, **kwargs)
    except Exception as e:
        raise TokenizerError(f"tokenizer failed {what}: {first_line(e)}") from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(f"tokenizer failed {what} (the tokenizers library panicked: {first_line(e)})") from None


class TextTokenizer:
    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        d = Path(directory)
        path = inside(d, "tokenizer.json", "tokenizer")
        if not path.is_file():
            raise ModelError(f"{path}: missing (the tokenizer is needed to encode prompts)")
        try:
            self.tokenizer = _library("to load", Tokenizer.from_file, str(path))
            self._plain = _library("to load", Tokenizer.from_file, str(path))  # toggling a flag is not thread-safe
        except TokenizerError as e:
            raise ModelError(f"{path}: not a valid tokenizers file ({e})") from None
        self._plain.encode_special_tokens = True  # special-token text is split like any other text
        self.config = _read_config(d)
        self.chat_template = self.config.get("chat_template")
        self._template = self._compile(d) if self.chat_template else None
        try:
            self._find_control_tokens(d, path)
        except TokenizerError as e:
            raise ModelError(f"{path}: {e}") from None
        # longest first, so that a special token that is a prefix of another never wins
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self._special_ids, key=len, reverse=True)))

    # ---- control tokens ----------------------------------------------------------------------------------------------
    def _find_control_tokens(self, d: Path, path: Path) -> None:
        """The ids user text must never produce: added tokens marked special, the tokens and ids that
        tokenizer_config.json, config.json, generation_config.json and manifest.json name (mask, end, bos, pad...),
        and every vocabulary entry that spells one of those (or looks like <|...|>), with or without word marks.
        The unknown token stands in for them in user text."""
        tok = self.tokenizer
        vocab = _library("to list its vocabulary", tok.get_vocab, with_added_tokens=True)
        added = _library("to list its added tokens", tok.get_added_tokens_decoder)
        model = json.loads(_library("to serialise", tok.to_str)).get("model") or {}
        self._max_id = max([*vocab.values(), *added], default=-1)
        unk_id = self._unknown_id(model, vocab, path)
        contents = {t.content for t in added.values() if t.special}
        ids = {i for i, t in added.items() if t.special}
        for key, v in self.config.items():
            if key == "additional_special_tokens" and isinstance(v, list):
                contents.update(_token_text(x) for x in v)
            elif key.endswith("_token") and key != "unk_token":
                contents.add(_token_text(v))
        decoder = self.config.get("added_tokens_decoder")
        for i, t in (decoder.items() if isinstance(decoder, dict) else ()):
            if isinstance(t, dict) and t.get("special") and str(i).isdigit():
                ids.add(int(i))
                contents.add(_token_text(t))
        named = _named_ids(d)
        mask_ids = named.pop("mask", set())
        mask_text = _token_text(self.config.get("mask_token"))
        if mask_text is not None and vocab.get(mask_text) is not None:
            mask_ids.add(vocab[mask_text])
        ids |= mask_ids | set().union(*named.values())
        contents.discard(None)
        contents.add(EOT_TOKEN)

        def looks_like_control(text: str) -> bool:
            core = text
            for mark in _WORD_MARKS:
                core = core.removeprefix(mark).removesuffix(mark)
            return core in contents or bool(_CONTROL_SHAPE.fullmatch(core))

        by_id: dict[int, list[str]] = {}
        for text, i in vocab.items():
            by_id.setdefault(i, []).append(text)
            if looks_like_control(text):
                ids.add(i)
        # the tokenizer's own decoding of each id, for vocabularies that store words in another alphabet (byte-level)
        pieces = _library("to decode its vocabulary", tok.decode_batch, [[i] for i in sorted(by_id)],
                          skip_special_tokens=False)
        ids.update(i for i, text in zip(sorted(by_id), pieces) if looks_like_control(text.strip()))
        if unk_id is not None and unk_id in mask_ids:
            raise TokenizerError(f"its unknown token (id {unk_id}) is the mask token")
        for i in sorted(mask_ids):
            ordinary = [t for t in by_id.get(i, []) if not looks_like_control(t)]
            if ordinary:
                raise TokenizerError(f"the ordinary word {ordinary[0]!r} has the mask token's id {i}; a prompt "
                                     f"holding it would be read as a position to fill in")
        if unk_id is not None and unk_id in ids:
            unk_id = None  # unknown words already become a control token: no safe stand-in
        self._unk_id = unk_id
        self._control_ids = frozenset(ids)
        # template markup spells control tokens by their plain text: each becomes its id, whatever the vocabulary
        self._special_ids = {t.content: i for i, t in added.items() if t.special}
        for text, i in vocab.items():
            if i in self._control_ids and text not in self._special_ids and looks_like_control(text) and text.strip():
                self._special_ids.setdefault(text, i)

    def _unknown_id(self, model: dict, vocab: dict, path: Path) -> int | None:
        if model.get("type") == "Unigram":
            unk = model.get("unk_id")
            return unk if isinstance(unk, int) and 0 <= unk <= self._max_id else None
        unk = model.get("unk_token")
        if unk is None:
            return None
        if vocab.get(unk) is None:
            raise TokenizerError(f"its unknown token {unk!r} is not in its vocabulary (unknown words could not be "
                                 f"encoded)")
        return vocab[unk]

    @property
    def control_ids(self) -> frozenset:
        """The ids that user text never yields (special, end, mask and other control tokens)."""
        return self._control_ids

    def max_token_id(self) -> int:
        """The largest id this tokenizer can produce (vocabulary and added tokens); the model's embedding must
        be larger."""
        return self._max_id

    def check_embedding(self, embedding_size: int) -> None:
        """One ModelError when the tokenizer can produce an id the model has no embedding row for."""
        if self._max_id >= embedding_size:
            raise ModelError(f"the tokenizer can produce id {self._max_id}, outside the model's embedding (size "
                             f"{embedding_size}): tokenizer.json belongs to another model")

    def _compile(self, d: Path):
        self._template_origin = str(d / "tokenizer_config.json")
        return compile_template(self.chat_template, self._template_origin)

    # pickled to Ray Serve's front end (runtime/ray_serve.py): a compiled template does not pickle, its source does
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_template": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plain.encode_special_tokens = True
        if self.chat_template:
            self._template = compile_template(self.chat_template, self._template_origin)

    def encode(self, text: str) -> list[int]:
        """User text: special-token spellings in it are encoded as ordinary text, and a piece of it that the
        vocabulary maps to a control token becomes the unknown token (ControlTokenText without one)."""
        text = _checked(text)
        # encode_batch releases the GIL (encode does not): a long prompt does not stall the server's event loop
        enc = _library("to encode text", self._plain.encode_batch, [text], add_special_tokens=False)[0]
        ids = enc.ids
        bad = [k for k, i in enumerate(ids) if i in self._control_ids]
        if not bad:
            return ids
        if self._unk_id is None:
            start, end = enc.offsets[bad[0]]
            raise ControlTokenText(f"the text {text[start:end]!r} would be read as control token id {ids[bad[0]]} "
                                   f"and this tokenizer has no unknown token to use instead; remove it")
        return [self._unk_id if i in self._control_ids else i for i in ids]

    def decode(self, ids: list[int]) -> str:
        return _library("to decode ids", self.tokenizer.decode, list(ids), skip_special_tokens=True)

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
        return render(self._template, messages, add_generation_prompt=True, **self._specials_for_template())

    def render_chat(self, messages: list[dict]) -> str:
        return self._render(self._check_messages(messages))

    def _check_messages(self, messages) -> list[dict]:
        """Only strings are kept apart from the template's markup (encode_chat), so only they may hold user text:
        a list or dict would be rendered as its repr and then read for special tokens."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("chat messages must be a list of objects")
        for m in messages:
            for k, v in m.items():
                self._check_field_name(k)
                if isinstance(v, str):
                    _checked(v)
                elif k in ("role", "content") or not (v is None or isinstance(v, (int, float))):
                    raise ValueError(f"message field {k!r} must be text, got {type(v).__name__}")
        return messages

    def _check_field_name(self, k) -> None:
        """A template may write the names of a message's fields (m.items()); they are not masked."""
        if not isinstance(k, str):
            raise ValueError(f"message field names must be text, got {type(k).__name__}")
        if self._special_re.pattern and self._special_re.search(_checked(k)):
            raise ValueError(f"message field name {k!r} contains special-token text; rename it")

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
