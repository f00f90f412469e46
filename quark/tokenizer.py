"""Quark's byte-level BPE tokenizer: training, HF-compatible saving, and the one ChatML renderer.

Choices:
- HF `tokenizers` BPE over bytes with Llama-3's split regex (digits in groups of 1-3, which suits math), so
  llama.cpp knows the pre-tokenizer (GGUF `tokenizer.ggml.pre = "llama-bpe"`). No normaliser, no prefix
  space: `decode(encode(s)) == s` for every string.
- Base vocabulary: `vocab_size` ids (default 65,536), `<|endoftext|>` is id 0 and separates documents in
  pre-training shards. The chat tokens come right after: `<|im_start|>` = vocab_size, `<|im_end|>` =
  vocab_size + 1 (65536 / 65537), stored in `tokenizer.json` so the card's `add_special_tokens` is a no-op.
- Two encoders: `encode` keeps marker text plain (message content can never forge a control token);
  `encode_prompt` turns markers into control tokens, as a hand-built prompt string in the card expects.
- `render_chat` is the single ChatML renderer for SFT, chat and serving. Each text run between control
  tokens is encoded as one piece, exactly as HF tokenizes the output of our `chat_template`, so
  `apply_chat_template(..., tokenize=True)` and `render_chat` give the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .io import atomic_write_text

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
    """Thin wrapper over an HF `tokenizers.Tokenizer` with Quark's ids and ChatML rendering."""

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        self.eot_id = tk.token_to_id(EOT)
        self.im_start_id = tk.token_to_id(IM_START)
        self.im_end_id = tk.token_to_id(IM_END)
        if None in (self.eot_id, self.im_start_id, self.im_end_id):
            raise ValueError(f"tokenizer lacks one of {EOT}, {IM_START}, {IM_END}; train it with `quark tokenizer train`")
        self.vocab_size = tk.get_vocab_size()  # base + 2 chat tokens = model embedding rows
        if (self.im_start_id, self.im_end_id) != (self.vocab_size - 2, self.vocab_size - 1):
            raise ValueError(f"chat tokens must be the last two ids, found {self.im_start_id}, {self.im_end_id} "
                             f"with vocab size {self.vocab_size}")
        # `plain` never matches control-token text inside strings (prompt-injection safety)
        self.plain = HFTokenizer.from_str(tk.to_str())
        self.plain.encode_special_tokens = True

    @property
    def base_vocab_size(self) -> int:
        return self.vocab_size - 2

    # ---- loading and saving -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: tokenizer file not found (train one with `quark tokenizer train`)")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        return cls(tk)

    def save(self, folder: str | Path, model_max_length: int = 2048) -> Path:
        """Write the standard HF files: tokenizer.json, tokenizer_config.json, special_tokens_map.json.
        `model_max_length` is the context of the model saved beside it (what transformers truncates to)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.tk.to_str(pretty=True))
        added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
                 for i, t in ((self.eot_id, EOT), (self.im_start_id, IM_START), (self.im_end_id, IM_END))}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": EOT,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special = {"eos_token": IM_END, "pad_token": EOT, "additional_special_tokens": [IM_START, IM_END]}
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
        """A hand-built prompt string -> ids, with '<|im_start|>' / '<|im_end|>' becoming control tokens."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- ChatML ------------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """messages [{"role", "content"}] -> (ids, loss_mask). The mask is 1 only on assistant content and
        its closing <|im_end|>. With add_generation_prompt, ends with '<|im_start|>assistant\\n'."""
        ids, mask = [], []
        for i, m in enumerate(messages):
            role, content = check_message(m, i)
            head = f"{role}\n"
            enc = self.plain.encode(head + content, add_special_tokens=False)
            train = role == "assistant"
            ids.append(self.im_start_id)
            mask.append(0)
            for tok, (start, _) in zip(enc.ids, enc.offsets):
                ids.append(tok)
                mask.append(int(train and start >= len(head)))
            newline = self.encode("\n")
            ids += [self.im_end_id] + newline
            mask += [int(train)] + [0] * len(newline)
        if add_generation_prompt:
            gen = [self.im_start_id] + self.encode("assistant\n")
            ids += gen
            mask += [0] * len(gen)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation followed by the assistant header, ready for generation."""
        return self.render_chat(messages, add_generation_prompt=True)[0]


def check_message(m: object, index: int) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise ValueError(f"message {index}: expected an object with 'role' and 'content', got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index}: 'content' must be a string, got {type(content).__name__}")
    return role, content
