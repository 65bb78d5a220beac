"""Tokenizer: text <-> token ids, chat templates, and incremental (streaming) detokenization.

Built on the `tokenizers` library (not transformers). Two sources:
- an HF directory: `tokenizer.json` + `tokenizer_config.json` (chat template, bos/eos), and
- GGUF metadata (`tokenizer.ggml.*`): byte-level BPE ("gpt2") rebuilt from tokens + merges, with the
  pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
`Tokenizer.save_hf(dir)` writes the HF pair, so a GGUF tokenizer can be reused by HF-directory models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added, not special).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes of the pre-tokenizers named in `tokenizer.ggml.pre` (what llama.cpp's llama-vocab uses for
# each name; they are the `Split` patterns of the original models' tokenizer.json files).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str):
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM / SmolLM2 (and StarCoder): every digit is its own word, then GPT-2's split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = {
        "llama3": _LLAMA3_SPLIT,
        "llama-v3": _LLAMA3_SPLIT,
        "llama-bpe": _LLAMA3_SPLIT,
        "qwen2": _QWEN2_SPLIT,
    }
    if pre in split:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(pre)


SUPPORTED_GGUF_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama3", "llama-v3", "llama-bpe", "qwen2")


def _token_content(tok) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as an AddedToken dict."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its `raise_exception(...)`) or the model has no template."""


def _compile_chat_template(source: str):
    # Chat templates are untrusted code from model repos: a sandboxed, immutable jinja2 environment, with the
    # same options and helpers transformers gives templates (trim/lstrip blocks, loopcontrols, a non-HTML-escaping
    # tojson, raise_exception, strftime_now), so the same template renders the same text.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(slots=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it (special ids, chat template)."""

    backend: tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    extra_eos_token_ids: list[int] = field(default_factory=list)
    _template: object = field(default=None, repr=False)
    _token_bytes: dict = field(default_factory=dict, repr=False)  # skip_special_tokens -> list[bytes]

    # ---- ids ---------------------------------------------------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = [] if self._id(self.eos_token) is None else [self._id(self.eos_token)]
        return ids + [i for i in self.extra_eos_token_ids if i not in ids]

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text --------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template (jinja2, sandboxed)."""
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer_config.json 'chat_template' or GGUF "
                "'tokenizer.chat_template'); send a plain text prompt instead of chat messages"
            )
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **kwargs,
        )

    def token_bytes(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """id -> the bytes it decodes to, for byte-level BPE decoders; None for other decoders."""
        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return None
        key = bool(skip_special_tokens)
        if self._token_bytes.get(key) is None:
            to_byte = {c: b for b, c in byte_level_alphabet().items()}
            table = [b""] * self.backend.get_vocab_size(with_added_tokens=True)
            for token, i in self.backend.get_vocab(with_added_tokens=False).items():
                table[i] = (
                    bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else token.encode()
                )
            for i, added in self.backend.get_added_tokens_decoder().items():
                table[i] = b"" if (added.special and skip_special_tokens) else added.content.encode()
            self._token_bytes[key] = table
        return self._token_bytes[key]

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict) -> Tokenizer:
        """Build from GGUF `tokenizer.ggml.*` metadata (as `gguf_reader.open_gguf` returns it: str, numbers, lists)."""
        kind = md.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
            )
        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in SUPPORTED_GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_PRE_TOKENIZERS)}"
            )
        tokens: list[str] = list(md["tokenizer.ggml.tokens"])
        types: list[int] = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        )
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) must stay whole in text and be skippable on decode.
        backend.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t, ty in zip(tokens, types)
                if ty == _TOKEN_CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types)
                if ty == _TOKEN_USER_DEFINED
            ]
        )

        def tok(key):
            i = md.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos = tok("bos_token_id")
        if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        return cls(
            backend=backend,
            bos_token=bos,
            eos_token=tok("eos_token_id"),
            pad_token=tok("padding_token_id"),
            unk_token=tok("unknown_token_id"),
            chat_template=md.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path) -> Tokenizer | None:
        """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) of an HF directory; None if absent."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 saves it next to the config
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get(
                "chat_template"
            )
        return cls(
            backend=backend,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            unk_token=_token_content(cfg.get("unk_token")),
            chat_template=template,
        )

    def save_hf(self, out_dir) -> None:
        """Write tokenizer.json + tokenizer_config.json (readable by `from_hf_dir` and by transformers)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(
            json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8"
        )


def load_default_tokenizer() -> Tokenizer:
    """The default model's (SmolLM2-135M-Instruct) tokenizer, from its GGUF metadata (~5 s: GGUF parsing)."""
    from .gguf_reader import read_gguf_metadata
    from .loader import default_gguf_path

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(default_gguf_path()))


def missing_tokenizer_error(source: str) -> ValueError:
    """The error for a text prompt on a model loaded without tokenizer files (token-id prompts still work)."""
    return ValueError(
        f"model {source!r} has no tokenizer (no tokenizer.json in the directory), so text prompts cannot be "
        "encoded: pass the prompt as a list of token ids, or add tokenizer.json + tokenizer_config.json "
        "to the model directory"
    )


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in token strings."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control bytes, space, 0x7f-0xa0, 0xad: shifted past 255
            table[b] = chr(256 + n)
            n += 1
    return table


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into a stream of text pieces that are always valid UTF-8.

    A byte-level token can end in the middle of a multi-byte character (emoji, CJK): that character's
    bytes are held back until it is complete.
    - Byte-level BPE (GPT-2 / Llama 3 / Qwen2 / SmolLM): tokens are mapped to their bytes and fed to Python's
      incremental UTF-8 decoder (errors="replace"), which holds back exactly an incomplete trailing sequence
      and replaces truly invalid bytes at once -- exact, O(new tokens).
    - Other decoders (SentencePiece Metaspace/byte-fallback): decode a short window of recent tokens (offsets as
      in vLLM's detokenizer; the context keeps leading-space handling right) and hold back a trailing U+FFFD.
    `flush()` at the end of a request returns whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids, skip_special_tokens: bool = True, byte_level=None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.text = ""  # all text emitted so far (generated part only)
        table = tokenizer.token_bytes(skip_special_tokens) if byte_level in (None, True) else None
        assert table is not None or byte_level is not True, "tokenizer is not byte-level"
        self._bytes = table
        if table is not None:
            import codecs

            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # offset path: ids[:read_offset] are turned into text; decoding restarts at prefix_offset for context;
        # `emitted` counts characters beyond decode(ids[prefix_offset:read_offset]) already returned.
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.emitted = 0

    def add(self, token_ids) -> str:
        """Append generated ids; return the newly completed text ('' while a character is incomplete)."""
        new = [int(t) for t in token_ids]
        self.ids.extend(new)
        if self._bytes is not None:
            n = len(self._bytes)  # ids past the tokenizer (padded model vocab) decode to nothing
            delta = self._utf8.decode(b"".join(self._bytes[t] for t in new if 0 <= t < n))
        else:
            delta = self._add_by_offsets()
        self.text += delta
        return delta

    def flush(self) -> str:
        if self._bytes is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._window_text()[self.emitted :]
            self.prefix_offset, self.read_offset, self.emitted = self.read_offset, len(self.ids), 0
        self.text += delta
        return delta

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_text(self) -> str:
        """Text of the unread ids: decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._decode(self.ids[self.prefix_offset :])[len(prefix) :]

    def _add_by_offsets(self) -> str:
        text = self._window_text()
        if text.endswith("\ufffd"):  # incomplete character: emit only what precedes it
            stable = text.rstrip("\ufffd")
            delta = stable[self.emitted :] if len(stable) > self.emitted else ""
            self.emitted += len(delta)
            return delta
        delta = text[self.emitted :]
        self.prefix_offset, self.read_offset, self.emitted = self.read_offset, len(self.ids), 0
        return delta
