"""Tokenizers: Quark's byte-level BPE (training, HF-compatible saving) and any model's own tokenizer files, with
the one chat renderer.

Choices:
- A model's tokenizer files are the truth about it: special tokens, BOS/EOS, stop ids (eos, generation_config's
  eos ids, the token its template closes a turn with) and the Jinja `chat_template` come from tokenizer.json,
  tokenizer_config.json and generation_config.json. Quark's own layout is one case: HF `tokenizers` BPE over
  bytes with Llama-3's split regex (llama.cpp's "llama-bpe"), `<|endoftext|>` = 0 between documents, then
  `<|im_start|>` / `<|im_end|>` as the last two ids and the ChatML template.
- Two encoders: `encode` keeps marker text plain (message content can never forge a control token);
  `encode_prompt` turns markers into control tokens, as a hand-built prompt string in the card expects.
- `render_chat` is the single chat renderer for SFT, chat and serving: the template renders text in a sandboxed
  Jinja environment (transformers' helpers); special-token text the template wrote becomes control tokens and
  the runs between them are encoded as one piece each, as HF tokenizes the rendered text, so
  `apply_chat_template(..., tokenize=True)` and `render_chat` give the same ids while message content stays text.
  The SFT loss mask of an assistant turn runs from the end of the prompt that asks for it to the token closing it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .io import atomic_write_text

N_CHAT_TOKENS = 2  # Quark's layout: <|im_start|>, <|im_end|> after the BPE vocabulary

EOT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
# Llama-3's pre-tokenizer split (llama.cpp: "llama-bpe").
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _new_bpe() -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int = 65536, length: int | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` base ids, then append the two chat tokens."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be at least 257 (256 bytes + {EOT})")
    seen = [0]

    def counted():
        for t in texts:
            if t:
                seen[0] += 1
                yield t

    tk = _new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tk.train_from_iterator(counted(), trainer=trainer, length=length)
    if seen[0] == 0:
        raise ValueError("tokenizer corpus is empty: no non-empty documents to train on")
    got = tk.get_vocab_size()
    if got < vocab_size:
        raise ValueError(f"the corpus only supports {got} tokens, fewer than vocab_size={vocab_size}; "
                         "give it more text or lower --vocab-size")
    tk.add_special_tokens([IM_START, IM_END])
    return Tokenizer(tk)


class Tokenizer:
    """An HF `tokenizers.Tokenizer` with the special tokens, chat template and stop ids of its model's own files.

    `config` is the model's tokenizer_config.json (chat_template, bos/eos tokens, ...), `generation` its
    generation_config.json (eos_token_id: one id or several). Quark's own tokenizers are one case of this: no
    config means Quark's layout (<|endoftext|>, then <|im_start|> / <|im_end|> as the last two ids, ChatML)."""

    def __init__(self, tk: HFTokenizer, config: dict | None = None, generation: dict | None = None):
        self.tk = tk
        self.vocab_size = tk.get_vocab_size()  # with added tokens: the embedding rows the model needs at least
        self.quark_layout = config is None or config.get("quark_layout", False)
        if config is None:
            config = quark_tokenizer_config(tk)
        self.config = config
        self.generation = generation or {}
        added = tk.get_added_tokens_decoder()
        self.special = {t.content: i for i, t in added.items() if t.special}
        self.special_pattern = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True))
                                          ) if self.special else None
        self.bos_token, self.eos_token = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
        self.bos_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        self.im_start_id, self.im_end_id = tk.token_to_id(IM_START), tk.token_to_id(IM_END)
        # the id between pre-training documents (and the prompt of an empty text)
        self.eot_id = next((tk.token_to_id(t) for t in DOC_SEPARATORS if tk.token_to_id(t) is not None), self.eos_id)
        if self.eot_id is None:
            raise ValueError(f"tokenizer has no end-of-text token (one of {', '.join(DOC_SEPARATORS)}) and no "
                             "eos_token in its tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) and template.strip() else None
        self._template = chat_environment().from_string(self.chat_template) if self.chat_template else None
        self.stop_ids = self._stop_ids()
        # `plain` never matches control-token text inside strings (prompt-injection safety)
        self.plain = HFTokenizer.from_str(tk.to_str())
        self.plain.encode_special_tokens = True

    @property
    def base_vocab_size(self) -> int:
        """Ids below the chat tokens in Quark's layout; the whole vocabulary otherwise."""
        return self.vocab_size - N_CHAT_TOKENS if self.quark_layout else self.vocab_size

    def _stop_ids(self) -> list[int]:
        """Where generation ends: eos, generation_config's eos ids, the token the chat template closes an
        assistant turn with, and the end-of-text id."""
        gen = self.generation.get("eos_token_id")
        ids = [self.eos_id, *(gen if isinstance(gen, list) else [gen])]
        if self._template is not None:
            try:
                text = self.render_text([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
                after = text[text.rindex("A") + 1:]
                m = self.special_pattern.search(after) if self.special_pattern else None
                ids.append(self.special[m.group()] if m else None)
            except Exception:  # a template that refuses this probe: eos alone ends turns
                pass
        ids.append(self.eot_id)
        return list(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < self.vocab_size))

    # ---- loading and saving -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json of a folder (with tokenizer_config.json / generation_config.json beside it when
        present) or the file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: tokenizer file not found (train one with `quark tokenizer train`)")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        config, generation = (read_json_object(file.parent / n) for n in ("tokenizer_config.json",
                                                                           "generation_config.json"))
        jinja_file = file.parent / "chat_template.jinja"  # where transformers >= 4.43 saves the template
        if config is not None and jinja_file.exists():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        if config is not None and is_quark_layout(tk, config):
            config = None  # Quark's own files: the layout is checked below
        try:
            return cls(tk, config, generation)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def save(self, folder: str | Path, model_max_length: int = 2048) -> Path:
        """Write the standard HF files: tokenizer.json, tokenizer_config.json, special_tokens_map.json.
        `model_max_length` is the context of the model saved beside it (what transformers truncates to)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.tk.to_str(pretty=True))
        config = {k: v for k, v in self.config.items() if k != "quark_layout"}
        config["model_max_length"] = model_max_length
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                          "additional_special_tokens") if config.get(k) is not None}
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
        return folder

    def sha256(self) -> str:
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()

    # ---- encoding ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Marker text such as '<|im_end|>' stays text."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like `encode`, over many texts, parallel across cores (Rust threads)."""
        return [e.ids for e in self.plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A hand-built prompt string -> ids, with special-token text ('<|im_start|>', ...) becoming control
        tokens."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------------------
    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages` (as transformers' apply_chat_template(tokenize=False))."""
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat_template (a base model?): use plain completion")
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """messages [{"role", "content"}] -> (ids, loss_mask) through the model's chat template. Special tokens
        come only from the template, never from message text. The mask is 1 on each assistant turn's tokens
        from its content to the token that closes it (trailing whitespace excluded)."""
        messages = [dict(zip(("role", "content"), check_message(m, i))) for i, m in enumerate(messages)]
        text = self.render_text(messages, add_generation_prompt)
        spans, cursor = [], 0  # where each message's content sits in the text
        for m in messages:
            at = text.find(m["content"], cursor) if m["content"] else -1
            spans.append((at, at + len(m["content"])) if at >= 0 else None)
            cursor = at + len(m["content"]) if at >= 0 else cursor
        ids, starts = self._encode_rendered(text, [s for s in spans if s])
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            lo, hi = self._turn_span(messages, i, text, spans[i])
            for j, st in enumerate(starts):
                mask[j] = mask[j] or int(lo <= st < hi)
        return ids, mask

    def _turn_span(self, messages: list[dict], i: int, text: str, content: tuple | None) -> tuple[int, int]:
        """Character span of assistant turn i: from the end of the prompt that asks for it to the end of the
        conversation up to it, less trailing whitespace; the content's own span where the template does not
        render prefixes as prefixes."""
        try:
            head = self.render_text(messages[:i], add_generation_prompt=True)
            upto = self.render_text(messages[:i + 1])
        except Exception:
            head = upto = None
        if head is not None and text.startswith(upto) and upto.startswith(head):
            lo, hi = len(head), len(upto)
        elif content is not None:
            lo, hi = content
            m = self.special_pattern.match(text, hi) if self.special_pattern else None
            hi = m.end() if m else hi
        else:
            return 0, 0
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        return lo, hi

    def _encode_rendered(self, text: str, content_spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids and start offsets of rendered chat text: special-token text outside message content becomes
        control tokens, the pieces between are encoded as plain text (as HF splits at added tokens)."""
        ids, starts, pos = [], [], 0
        controls = [m for m in (self.special_pattern.finditer(text) if self.special_pattern else ())
                    if not any(a <= m.start() < b for a, b in content_spans)]
        for m in [*controls, None]:
            end = m.start() if m else len(text)
            if end > pos:
                enc = self.plain.encode(text[pos:end], add_special_tokens=False)
                ids += enc.ids
                starts += [pos + a for a, _ in enc.offsets]
            if m:
                ids.append(self.special[m.group()])
                starts.append(m.start())
                pos = m.end()
        return ids, starts

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation followed by the assistant header, ready for generation."""
        return self.render_chat(messages, add_generation_prompt=True)[0]


DOC_SEPARATORS = (EOT, "<|end_of_text|>", "</s>", "<|end|>")


def token_text(t: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return t.get("content") if isinstance(t, dict) else t if isinstance(t, str) else None


def read_json_object(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def is_quark_layout(tk: HFTokenizer, config: dict) -> bool:
    """Quark's own tokenizer files: ChatML tokens as the last two ids and Quark's template."""
    n = tk.get_vocab_size()
    return (tk.token_to_id(IM_START), tk.token_to_id(IM_END)) == (n - 2, n - 1) and tk.token_to_id(EOT) is not None \
        and config.get("chat_template") == CHAT_TEMPLATE


def quark_tokenizer_config(tk: HFTokenizer) -> dict:
    """tokenizer_config.json of Quark's layout; a tokenizer without it is refused."""
    eot, start, end = tk.token_to_id(EOT), tk.token_to_id(IM_START), tk.token_to_id(IM_END)
    if None in (eot, start, end):
        raise ValueError(f"tokenizer lacks one of {EOT}, {IM_START}, {IM_END} and has no tokenizer_config.json; "
                         "train it with `quark tokenizer train`")
    n = tk.get_vocab_size()
    if (start, end) != (n - 2, n - 1):
        raise ValueError(f"chat tokens must be the last two ids, found {start}, {end} with vocab size {n}")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in ((eot, EOT), (start, IM_START), (end, IM_END))}
    return {"quark_layout": True, "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END], "bos_token": None, "eos_token": IM_END,
            "pad_token": EOT, "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
            "chat_template": CHAT_TEMPLATE}


def chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A sandboxed Jinja environment as transformers renders chat templates in (the same helpers)."""
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple | None = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def check_message(m: object, index: int) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise ValueError(f"message {index}: expected an object with 'role' and 'content', got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index}: 'content' must be a string, got {type(content).__name__}")
    return role, content
