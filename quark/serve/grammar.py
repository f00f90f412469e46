"""Structured output: `response_format` ({"type": "json_object"} or {"type": "json_schema", ...}) as a grammar that
constrains decoding, through xgrammar.

Choices:
- xgrammar, not llguidance: bench/grammar_cost.py measured both on SmolLM2's 49,152-token vocabulary (dev/LOG.md);
  xgrammar's mask cost a fraction of a millisecond per token at batch 1, llguidance's tens of milliseconds.
- A request's format becomes a JSON schema string (`json_object`: {"type": "object"}), checked in the server
  process (`schema_of`: a 400 naming the problem for anything malformed, not valid JSON Schema, or beyond what
  xgrammar compiles), then compiled in the engine once per distinct schema (xgrammar's compiler caches it).
- JSON is compact (no free whitespace between tokens: a small model would otherwise pad with newlines until
  max_tokens) and strict (no properties beyond the schema's). Once the document is complete only the model's stop
  tokens are allowed, so the reply ends there.
- Masking by rejection: a row's token is first sampled as usual; only if the grammar refuses it is the row's
  bitmask computed and the token sampled again from the masked logits. The result is distributed exactly as
  sampling from the masked distribution (a token t of the allowed set A comes first with p(t), or after a
  rejection, probability 1 - p(A), with p(t) / p(A): p(t) / p(A) in all), and the mask, the costly part, is only
  built when the model strays. Greedy rows get the masked argmax either way.
- The vocabulary is given to xgrammar as raw bytes per token (quark/serve/logprobs.py `token_bytes`); special
  tokens other than the stop tokens are empty, which xgrammar never allows.
"""

from __future__ import annotations

import json

import torch

from ..tokenizer import Tokenizer
from .logprobs import token_bytes


class FormatError(ValueError):
    """A response_format that cannot be served; the message names the problem."""


def schema_of(fmt: object) -> str | None:
    """The JSON schema (a string) a `response_format` asks for; None for plain text; FormatError if invalid."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise FormatError("must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                          f"\"json_schema\": {{\"name\": ..., \"schema\": {{...}}}}}}, got {json.dumps(fmt)[:80]}")
    if fmt["type"] == "text":
        raise FormatError("{\"type\": \"text\"} takes no other fields")
    if fmt["type"] == "json_object":
        schema: object = {"type": "object"}
    else:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise FormatError("'json_schema' must be an object with a 'schema' object (and a 'name')")
        schema = spec.get("schema", {})
    try:
        import jsonschema

        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ImportError:
        pass
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise FormatError(f"the schema is not valid JSON Schema at {where}: {e.message}") from None
    text = json.dumps(schema)
    try:
        import xgrammar as xgr

        xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
    except ImportError:
        raise FormatError("structured output needs xgrammar on the server: pip install 'quark[serve]'") from None
    except Exception as e:  # noqa: BLE001 -- xgrammar's errors name the unsupported construct
        raise FormatError(f"the schema cannot be compiled to a grammar: {str(e)[:200]}") from None
    return text


class Grammars:
    """Per engine: the vocabulary as xgrammar sees it, a compiler (caching compiled schemas), matchers per row."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int], device: torch.device | str = "cpu"):
        import xgrammar as xgr

        self.xgr = xgr
        special = set(tokenizer.special.values())
        vocab = [b"" if i in special else token_bytes(tokenizer, i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids)
        # tokens holding a JSON delimiter: the repetition penalty spares them in constrained rows (the engine)
        self.structural = torch.zeros(vocab_size, dtype=torch.bool)
        self.structural[[i for i, b in enumerate(vocab) if any(c in b for c in b'"{}[],:')]] = True
        self.structural = self.structural.to(device)  # once: the engine reads it at every constrained step
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self.compiled: dict[str, object] = {}

    def matcher(self, schema: str) -> object:
        grammar = self.compiled.get(schema)
        if grammar is None:
            grammar = self.compiled[schema] = self.compiler.compile_json_schema(schema, any_whitespace=False,
                                                                                strict_mode=True)
        return self.xgr.GrammarMatcher(grammar)

    def mask(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """logits (n, V) with every token the rows' matchers refuse set to -inf (a copy)."""
        bitmask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        out = logits.float().clone()
        self.xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device))
        return out
