"""The runtime tokenizer: byte-level BPE (HF `tokenizers`) as lmforge encodes and decodes it,
its special tokens and chat template. Training one is the `lmforge tokenizer` stage, in
tokenizer_train.py.

The one idea: text is split by a regex into pre-tokens, each pre-token is mapped to bytes (every
byte is in the base alphabet), and BPE merges bytes within a pre-token. So any string round-trips
exactly, nothing is ever <unk>, and `encode` treats special-token strings typed by a user as plain
text: only code can put a real <|im_start|> into a sequence.

Chinese: GPT-4's regex lets a letter run swallow Han characters, so "Python编程" is one pre-token.
We split Han runs from other letters and cap them at 16 characters (unpunctuated classical text
would otherwise make pre-tokens of whole pages). Measured on the bundled corpus at vocab 8192,
zh val bytes/token: Han runs whole 3.36, capped at 16 3.36, one pre-token per Han character 2.92
(it can never learn a multi-character word), runs of 2 3.12, of 4 3.20; English is 3.27-3.39.
At vocab 16384 the gap grows: 3.86 for whole runs against 3.03 for single characters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np

from lmforge.config import ConfigError

ROLES = ("system", "user", "assistant")  # the chat roles a conversation may hold
SPECIAL_TOKENS = [
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|reserved_{i}|>" for i in range(8)),  # kept free for later stages (tools, thinking, ...)
]
PAD, BOS, EOS = SPECIAL_TOKENS[:3]

# GPT-4 (cl100k) split, with Han characters taken out of the letter rule into runs of at most 16:
# contractions | optional punctuation + non-Han letters | optional punctuation + Han | 1-3 digits |
# punctuation runs | newlines | other whitespace
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?+[^\P{L}\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?+\p{Han}{1,16}"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s+(?!\S)"
    r"|\s+"
)

END_OF_TURN = "<|im_end|>"  # ChatML's end of a turn: a chat model stops there, as at EOS

# The words around the tool list in a system prompt (the Hermes / Qwen2.5 convention, see
# "tools in a chat" below): the same in CHAT_TEMPLATE and in `tools_system_text`
TOOLS_INTRO = (
    "# Tools\n\nYou may call functions to help answer. Their signatures, one JSON object a "
    "line, are inside <tools></tools>:\n<tools>\n"
)
TOOLS_HOWTO = (
    "\n</tools>\n\nTo call one, reply with a JSON object inside <tool_call></tool_call> tags, "
    'one per call:\n<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n'
    "</tool_call>"
)


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


# ChatML, opened by BOS: the template writes the BOS the model was trained with, so every tool
# that renders it (transformers' apply_chat_template, llama.cpp, vLLM) encodes what SFT trained
# on; add_generation_prompt opens the assistant turn so the model writes the reply. Tool-aware:
# without tools, tool calls or tool messages it renders plain ChatML; with them, what
# `hermes_messages` writes (the tool list in the system turn, calls as <tool_call> blocks,
# a run of tool results as one user turn of <tool_response> blocks).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set first = 0 %}"
    "{%- if tools %}"
    "{%- set block = " + _jinja_str(TOOLS_INTRO) + " + (tools | map('tojson') | join('\\n'))"
    " + " + _jinja_str(TOOLS_HOWTO) + " %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set block = ((messages[0]['content'] or '') + '\\n\\n' + block) | trim %}"
    "{%- set first = 1 %}"
    "{%- endif %}"
    "{{ '<|im_start|>system\\n' + block + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages[first:] %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user\\n' }}"
    "{%- else %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for c in message['tool_calls'] %}"
    "{%- set f = c['function'] if c['function'] is defined else c %}"
    "{%- if message['content'] or not loop.first %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_call>\\n' + ({'name': f['name'], 'arguments': f['arguments']} | tojson) }}"
    "{{ '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# the template lmforge's chat models were trained with before it took tools: the same text for
# conversations without them (tests compare the two)
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _tokenizers():
    import tokenizers  # imported here so that `import lmforge.tokenizer` stays cheap

    return tokenizers


def _write_atomic(path: Path, text: str) -> None:
    # a reader (or a crash) never sees half a file: write beside it, then rename over it
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- chat templates


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Jinja with the environment transformers' apply_chat_template uses: sandboxed,
    trim_blocks + lstrip_blocks, loop controls, `raise_exception`, a non-escaping `tojson`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(
            f"chat_template is not valid Jinja (line {e.lineno}): {e.message}"
        ) from None


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs
) -> str:
    """Render a conversation (a list of {"role", "content"} dicts) with a Jinja chat template,
    with the semantics of transformers' `apply_chat_template(tokenize=False)`; kwargs
    (bos_token, eos_token, ...) are visible to the template."""
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConfigError(f"message {i} must be a dict with a string 'role', got {m!r}")
    try:
        return _compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.exceptions.TemplateError as e:
        raise ConfigError(f"chat template: {e}") from None


# --------------------------------------------------------------------------- tools in a chat
# Function calling follows the Hermes / Qwen2.5 convention: the signatures go into the system
# prompt inside <tools></tools>, the model calls with <tool_call>{"name", "arguments"}</tool_call>
# and results come back inside <tool_response></tool_response> in a user turn. A template that
# takes a `tools` variable (Qwen2.5, Hermes, Llama 3.1) renders all of that itself; for one
# that does not (lmforge's ChatML, SmolLM2) `hermes_messages` writes it into plain messages.

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def template_takes_tools(template: str | None) -> bool:
    """Whether a Jinja chat template reads a `tools` variable (it renders tools itself)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def tool_call_text(name: str, arguments) -> str:
    """One call as the model writes it; `arguments` a dict (or a string that is not JSON)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def tools_system_text(tools: list[dict]) -> str:
    """The system-prompt block that lists the functions (OpenAI's `tools` entries)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"{TOOLS_INTRO}{lines}{TOOLS_HOWTO}"


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain {"role", "content"} messages carrying tools the Hermes way, for a template that
    has no `tools` variable: the tool list appended to the system prompt (one is added if
    there is none), an assistant's `tool_calls` written as <tool_call> blocks after its text,
    and each run of `tool` messages merged into one user turn of <tool_response> blocks.
    Tool calls' "arguments" are JSON objects here (OpenAI sends them as strings)."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":  # consecutive results share one turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                tool_call_text(c["function"]["name"], c["function"]["arguments"])
                for c in m["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": role, "content": content})
    if tools:
        block = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _hide_specials(value, hidden: dict[str, str]):
    """A copy of a message (or a tool list) whose strings, content, tool calls' arguments and
    tool descriptions alike, have each special-token string replaced by its sentinel."""
    if isinstance(value, str):
        for sentinel, special in hidden.items():
            value = value.replace(special, sentinel)
        return value
    if isinstance(value, dict):
        return {k: _hide_specials(v, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_specials(v, hidden) for v in value]
    return value


# --------------------------------------------------------------------------- the wrapper


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that fixes how lmforge encodes and decodes."""

    def __init__(
        self,
        tok,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        chat_template: str | None = CHAT_TEMPLATE,
    ):
        self._tok = tok
        self.chat_template = chat_template  # Jinja source; None: a base model with no chat format
        # sequences start with BOS unless the tokenizer has none of its own (Qwen2: the EOS
        # fallback below is then only a stand-in, never prepended)
        self.prepend_bos = bos_token is not None
        self._tok.encode_special_tokens = True  # user text never produces special ids
        # tokenizers without BOS or PAD (Qwen2, GPT-2) use EOS there, as GPT-2 does
        self.bos_token = bos_token if bos_token is not None else eos_token
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        for role in ("bos_token", "eos_token", "pad_token"):
            name = getattr(self, role)
            if name is None or tok.token_to_id(name) is None:
                raise ConfigError(f"tokenizer has no {role} ({name!r} is not in its vocabulary)")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Open a tokenizer directory (or its tokenizer.json); bos/eos/pad come from
        tokenizer_config.json when it is there, so Hugging Face tokenizers open too."""
        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"no tokenizer at {path}: {file} does not exist")
        try:
            tok = _tokenizers().Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception for bad JSON and bad models
            raise ConfigError(f"{file} is not a valid tokenizer.json: {e}") from None
        names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
            for key in names:  # a missing bos or pad falls back to eos in __init__
                value = cfg.get(key)
                names[key] = value.get("content") if isinstance(value, dict) else value
            template = cfg.get("chat_template")
            if isinstance(template, list):  # HF's named-template form: take the default one
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            names["chat_template"] = template if isinstance(template, str) else None
        return cls(tok, **names)

    def save(self, path: str | Path, model_max_length: int = 2048) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, the files
        transformers' AutoTokenizer.from_pretrained reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        extra = [t for t in ("<|im_start|>", "<|im_end|>") if self._tok.token_to_id(t) is not None]
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        bos = self.bos_token if self.prepend_bos else None  # not the EOS stand-in: it loads back
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,  # byte-level: every string is encodable, there is no unknown token
            "additional_special_tokens": extra,
            "model_max_length": model_max_length,
            # lmforge's own encodes never add specials (it places BOS/EOS itself, per document);
            # this tells transformers whether `tok(text)` does, as tokenizer.json's post-processor
            # says (transformers 5 rebuilds that post-processor from this flag)
            "add_bos_token": self.adds_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # it would change text and break round trips
            **({"chat_template": self.chat_template} if self.chat_template else {}),
            "added_tokens_decoder": added,
        }
        special_map = {
            "bos_token": bos,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": extra,
        }
        _write_atomic(path / "tokenizer.json", self._tok.to_str(pretty=True))
        _write_atomic(
            path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False)
        )
        _write_atomic(path / "special_tokens_map.json", json.dumps(special_map, indent=2))

    # --- encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added; "<|eos|>" inside text is encoded as plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept as their strings, so nothing is silently lost."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def special_tokens(self) -> list[str]:
        """Strings of the special added tokens (<|bos|>, <|im_start|>, ...), longest first."""
        added = self._tok.get_added_tokens_decoder().values()
        return sorted((t.content for t in added if t.special), key=len, reverse=True)

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of text made by a chat template: the special-token strings in it become special
        ids, everything between them is encoded as plain text."""
        specials = self.special_tokens()
        if not specials:
            return self.encode(text)
        ids: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
            if i % 2:
                ids.append(self.token_id(piece))
            elif piece:
                ids.extend(self.encode(piece))
        return ids

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, tools=None
    ) -> str:
        """The conversation as text through this tokenizer's chat template (see `render_chat`);
        `tools` (OpenAI's tool list) is passed to a template that takes them (see
        `template_takes_tools`), else None."""
        if not self.chat_template:
            raise ConfigError(
                "this tokenizer has no chat_template (a base model): use plain completion, or add "
                "a chat_template to its tokenizer_config.json"
            )
        # a tokenizer without BOS of its own (Qwen2) renders `{{ bos_token }}` as nothing, as
        # transformers does, never as the EOS stand-in
        bos = self.bos_token if self.prepend_bos else ""
        special = {"bos_token": bos, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if tools:
            special["tools"] = tools
        return render_chat(self.chat_template, messages, add_generation_prompt, **special)

    def chat_prefix(self, messages: list[dict]) -> list[int]:
        """[BOS] to put before a rendered conversation, or [] when the tokenizer has no BOS of
        its own or its template already writes one (Llama-3 style `{{ bos_token }}`)."""
        if not self.prepend_bos:
            return []
        return [] if self.render_chat(messages).startswith(self.bos_token) else [self.bos_id]

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, tools=None
    ) -> list[int]:
        """Token ids of a conversation. Special-token strings typed inside a message stay plain
        text: only the template's own markers become special ids."""
        segments = self.encode_chat_segments(messages, add_generation_prompt, tools)
        return [i for ids, _ in segments for i in ids]

    def encode_chat_segments(
        self, messages: list[dict], add_generation_prompt: bool = False, tools=None
    ) -> list[tuple[list[int], bool]]:
        """The conversation as (ids, is_assistant_reply) pieces, in order. A reply is what the
        template adds for an assistant message after its generation prompt (the content and
        the end-of-turn marker), so training on replies matches what the model sees when it
        is asked to generate. Each piece is encoded on its own, as at generation time."""
        nonce = f"\ue000{os.urandom(6).hex()}"  # hides special strings inside message text
        hidden = {f"{nonce}{i}\ue000": s for i, s in enumerate(self.special_tokens())}
        safe = [_hide_specials(m, hidden) for m in messages]
        tools = _hide_specials(tools, hidden)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(safe):
            if m.get("role") != "assistant":
                continue
            prompt = self.render_chat(safe[:i], add_generation_prompt=True, tools=tools)
            full = self.render_chat(safe[: i + 1], tools=tools)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError(
                    "the chat template does not render conversations incrementally (a prefix of "
                    "the conversation must render as a prefix of its text), so assistant replies "
                    "cannot be located for loss masking"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        rest = self.render_chat(safe, add_generation_prompt, tools=tools)
        if not rest.startswith(done):
            raise ConfigError("the chat template does not render conversations incrementally")
        pieces.append((rest[len(done) :], False))
        return [(self._encode_unhiding(text, hidden), reply) for text, reply in pieces]

    def _encode_unhiding(self, text: str, hidden: dict[str, str]) -> list[int]:
        """encode_rendered, with hidden special strings put back as plain text."""
        if not hidden:
            return self.encode_rendered(text)
        ids: list[int] = []
        for j, part in enumerate(re.split("(" + "|".join(map(re.escape, hidden)) + ")", text)):
            ids += self.encode(hidden[part]) if j % 2 else self.encode_rendered(part)
        return ids

    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS, and the end-of-turn marker where the vocabulary has
        one (a chat model ends its reply with it, not with EOS)."""
        ids = [self.eos_id]
        if END_OF_TURN in self.special_tokens():
            ids.append(self.token_id(END_OF_TURN))
        return tuple(ids)

    @property
    def adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor puts BOS before text encoded by other tools
        with their default add_special_tokens=True (lmforge's own encodes never add it)."""
        if not self.prepend_bos:
            return False
        return self._tok.encode("x", add_special_tokens=True).ids[:1] == [self.bos_id]

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens): summed over a sequence it gives
        the text's length in bytes, the denominator of bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        byte_level = json.loads(self._tok.to_str()).get("decoder", {}) or {}
        byte_level = byte_level.get("type") == "ByteLevel"
        added = self._tok.get_added_tokens_decoder()
        for i in range(self.vocab_size):
            if i in added:
                t = added[i]
                out[i] = 0 if t.special else len(t.content.encode("utf-8"))
            elif byte_level:
                out[i] = len(self._tok.id_to_token(i))  # one alphabet character per byte
            else:  # other decoders (e.g. sentencepiece-style): the best we can do is decode it
                out[i] = len(self._tok.decode([i]).encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json text (first 16 hex): shards remember which tokenizer made them."""
        return hashlib.sha256(self._tok.to_str(pretty=True).encode("utf-8")).hexdigest()[:16]
