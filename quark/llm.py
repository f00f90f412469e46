"""The Python front door: `quark.load(path)` -> an `LLM` that generates, chats and streams text.

    import quark
    llm = quark.load("runs/tiny/export/Quark-Tiny-Instruct")     # any folder `quark` loads
    llm.chat([{"role": "user", "content": "What is 7 plus 5?"}])   # -> "12" (one reply)
    llm.generate(["def add(a, b):", "The capital of Italy"], max_new_tokens=20)  # batch -> list of str
    for piece in llm.stream("Once upon a time"): print(piece, end="")

Choices (litgpt's `LLM.load(...).generate(...)`, nanochat's `Engine`):
- One decoding path: the same continuous-batching `Engine` that `quark chat` and `quark serve` run, driven in the
  caller's thread. A list of prompts is one batch; each prompt's reply is what it would be alone (with a `seed`,
  token for token what `quark chat --seed` and `generate(..., seed=)` give).
- Defaults are the model card's recommended sampling, `quark.sampling.RECOMMENDED`; any call may override
  `temperature`, `top_p`, `rep_penalty`, `max_new_tokens`, `seed`. `temperature=0` is greedy. `response_format`
  (OpenAI's json_object / json_schema) constrains the reply to JSON, as the server does.
- `generate` takes plain text (for base models); `chat` renders OpenAI-format messages with the ChatML template
  (for instruction-tuned models). Both stop at <|im_end|> and <|endoftext|>, which never appear in the text.
- `load` takes a run folder (newest checkpoint), a checkpoint, an HF export or a Llama folder; `device="auto"`
  picks CUDA (bf16 weights) when present, else the CPU (fp32); `quantize="int8"` makes int8 weight-only linears.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from .config import QuarkConfig
from .model import Quark
from .sampling import RECOMMENDED
from .serve.engine import Engine, Request, SamplingParams
from .serve.grammar import FormatError, schema_of
from .serve.text import IncrementalDecoder
from .tokenizer import Tokenizer
from .weights import load_for_inference


class LLM:
    """A model and its tokenizer, ready to generate. Build one with `quark.load` (or from objects you hold)."""

    def __init__(self, model: Quark, tokenizer: Tokenizer, name: str = "model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.defaults = SamplingParams(**RECOMMENDED)
        self._engine: Engine | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", quantize: str | None = None) -> LLM:
        model, tokenizer = load_for_inference(path, device, quantize)
        return cls(model, tokenizer, name=Path(path).name)

    @property
    def config(self) -> QuarkConfig:
        return self.model.config

    # ---- prompts -> ids ------------------------------------------------------------------------------------
    def params(self, **sampling) -> SamplingParams:
        """The defaults with `sampling` overrides, checked (ValueError names the field). `response_format` is
        OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}} constrain the
        reply to that JSON (quark/serve/grammar.py)."""
        unknown = set(sampling) - set(RECOMMENDED) - {"seed", "response_format"}
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {', '.join(sorted(unknown))}; allowed: "
                            f"{', '.join([*RECOMMENDED, 'seed', 'response_format'])}")
        if "response_format" in sampling:
            try:
                sampling["schema"] = schema_of(sampling.pop("response_format"))
            except FormatError as e:
                raise ValueError(f"response_format {e}") from None
        params = replace(self.defaults, **sampling)
        params.check()
        return params

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """A conversation rendered with the ChatML template, ending with the assistant's header."""
        return self.tokenizer.render_prompt(list(messages))

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], **sampling) -> str | list[str]:
        """Continue plain text; a list of prompts runs as one batch and returns a list."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = self._run([self.tokenizer.encode(p) for p in prompts], self.params(**sampling))
        return texts[0] if isinstance(prompt, str) else texts

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], **sampling) -> str | list[str]:
        """The assistant's reply to a conversation (a list of {"role", "content"}); a list of conversations runs
        as one batch and returns a list of replies."""
        one = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if one else list(messages)
        texts = self._run([self.chat_ids(c) for c in convs], self.params(**sampling))
        return texts[0] if one else texts

    def stream(self, prompt: str | Sequence[dict], **sampling) -> Iterator[str]:
        """Pieces of text as they are generated, for a plain-text prompt or a conversation (messages)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.chat_ids(prompt)
        decoder = IncrementalDecoder(self.tokenizer)
        for tok in self.stream_ids(ids, self.params(**sampling)):
            piece = decoder.push(tok)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def stream_ids(self, ids: Sequence[int], params: SamplingParams) -> _Stream:
        """Token ids of one reply as they come (stop tokens excluded). The returned iterator has the request as
        `.request` once started; closing it early cancels the request."""
        engine = self._engine_for(1)
        req = engine.submit(list(ids), params)
        return _Stream(engine.iter_tokens(req), req)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        engine = self._engine_for(len(prompts))
        reqs = [engine.submit(ids, params) for ids in prompts]
        return [self.tokenizer.decode(list(engine.iter_tokens(r))) for r in reqs]

    def _engine_for(self, batch: int) -> Engine:
        if self._engine is None or self._engine.max_batch < batch:
            tok = self.tokenizer
            self._engine = Engine(self.model, tok.stop_ids, max_batch=max(batch, 1), tokenizer=tok)
        return self._engine

    def __repr__(self) -> str:
        c = self.model.config
        return f"LLM({self.name!r}, {c.n_layers} layers, d_model {c.d_model}, context {c.context_length})"


class _Stream:
    """An iterator of token ids that also carries its engine request (finish_reason after the end)."""

    def __init__(self, it: Iterator[int], request: Request):
        self._it, self.request = it, request

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        self._it.close()


def load(path: str | Path, device: str = "auto", quantize: str | None = None) -> LLM:
    """`LLM.load`: any folder `quark` loads (run, checkpoint, HF export, Llama folder)."""
    return LLM.load(path, device=device, quantize=quantize)
