"""Parsing and validating OpenAI-style request bodies into engine work; building the response objects.

Choices:
- Bodies are read and checked by hand (not pydantic) so every problem is a 400 in OpenAI's error shape
  (`{"error": {"message", "type", "param", "code"}}`) naming the field and the allowed values.
- Omitted sampling fields default to the model card's recommended configuration (`quark.sampling.RECOMMENDED`),
  not OpenAI's temperature 1.0 / top_p 1.0: that is what this model needs to stay coherent.
- `max_tokens` (or `max_completion_tokens`) is capped by the room left in the context and by the server-wide
  limit; a prompt that leaves no room at all is a 400 `context_length_exceeded`. `max_tokens: 0` is accepted
  only with `echo: true` (scoring a prompt, as lm-evaluation-harness and vLLM do).
- Log-probs: the completions API's `logprobs: N` (0..20: each token's log-prob and the N likeliest) and `echo`
  (the prompt's text and, with `logprobs`, its tokens' log-probs, the first one null); the chat API's `logprobs:
  true` and `top_logprobs: N`. Their figures are the model's raw distribution (quark/serve/logprobs.py).
- Fields this server does not implement are refused (400 `unsupported_parameter`), never silently ignored:
  `suffix`, `tools`, ... when set (and `echo` on the chat API); `presence_penalty` / `frequency_penalty` other than 0 (they must still be
  numbers in OpenAI's [-2, 2]; `repetition_penalty` is this server's penalty).
- `response_format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
  "schema"}} on both endpoints; the reply is then constrained to that JSON (quark/serve/grammar.py). A malformed
  format or an invalid schema is a 400 `invalid_response_format` naming the problem.
- The OpenAI `developer` role is the `system` role; any other role outside system/user/assistant is a 400.
- Malformed bodies are 400s too: JSON nested deeper than the parser's recursion limit, and strings holding a
  lone UTF-16 surrogate (`"x\\ud800y"` is valid JSON but not Unicode, and the tokenizer cannot take it); the
  error names the field.
- Work is bounded before it starts: `count_sequences` counts prompts x n from the body alone (no tokenizing),
  so an oversized request is refused before any work; `check_budget` then bounds (prompt + max_tokens) x n.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

from ..sampling import RECOMMENDED
from ..tokenizer import Tokenizer
from .engine import SamplingParams
from .grammar import FormatError, schema_of
from .logprobs import MAX_TOP

DEFAULTS = {"temperature": RECOMMENDED["temperature"], "top_p": RECOMMENDED["top_p"],
            "repetition_penalty": RECOMMENDED["rep_penalty"]}
MAX_N = 16
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", retry_after: int | None = None, *, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.retry_after = retry_after  # seconds, sent as the Retry-After header (429, 503)
        self.close = close  # end the connection after this answer (the rest of the request was not read)

    def headers(self) -> dict[str, str] | None:
        out = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        if self.close:
            out["Connection"] = "close"
        return out or None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe a lone surrogate


def parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259), not json.loads' guessed UTF-16/32
        body = json.loads(text, parse_constant=_not_json)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:120]})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if SURROGATE_ESCAPE.search(text):  # only then can a string hold one (raw UTF-8 cannot encode a surrogate)
        _check_unicode(body)
    return body


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _check_unicode(body: dict) -> None:
    """400 naming a string (key or value) that holds a lone surrogate. Iterative: no depth limit."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                stack.append((f"{path}.{k}" if path else str(k), k))
                stack.append((f"{path}.{k}" if path else str(k), x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                name = path.encode("utf-8", "backslashreplace").decode()
                raise APIError(400, f"'{name}' is not valid Unicode: it holds a lone surrogate "
                               f"(\\u{ord(v[e.start]):04x}) at character {e.start}", param=name,
                               code="invalid_unicode") from None


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)[:40]}", param=name)
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be in {rng}, got {v}", param=name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(v)[:40]}", param=name)
    if v < lo or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be {allowed}, got {v}", param=name)
    return v


@dataclass
class Job:
    """What the engine must run for one HTTP request."""

    prompts: list[list[int]]  # one per prompt; each is run `n` times
    n: int
    params: SamplingParams  # max_new_tokens already capped for the longest prompt
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: no log-probs; N: the N likeliest tokens beside each one
    echo: bool = False  # completions: the prompt comes back in front of the text (and its log-probs)

    def params_for(self, choice: int) -> SamplingParams:
        p = self.params
        return replace(p, seed=None if p.seed is None else p.seed + choice)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    if model is not None and model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


def count_sequences(body: dict, max_seqs: int, chat: bool) -> int:
    """prompts x n of a request, from the body alone (nothing tokenized yet); 400 over `max_seqs`."""
    n = _integer(body, "n", 1, MAX_N) or 1
    p = None if chat else body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        prompts = len(p)  # several prompts (a list of token ids is one prompt)
    else:
        prompts = 1  # a string, one token id list, a chat, or a malformed prompt that parsing refuses
    if prompts * n > max_seqs:
        raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} sequences; the limit "
                       f"per request is {max_seqs} (server option --max-request-seqs)", param="n" if prompts == 1
                       else "prompt", code="too_many_sequences")
    return prompts * n


def check_budget(job: Job, max_tokens: int) -> int:
    """(prompt + max_tokens) x n summed over the prompts; 400 over the server's per-request `max_tokens`."""
    total = sum(len(p) + job.params.max_new_tokens for p in job.prompts) * job.n
    if total > max_tokens:
        raise APIError(400, f"this request could use {total} tokens ((prompt + max_tokens) x n, summed over "
                       f"{len(job.prompts)} prompt(s)); the limit per request is {max_tokens} (server option "
                       "--max-request-tokens). Lower max_tokens or n, or send fewer prompts.", param="max_tokens",
                       code="request_too_large")
    return total


UNSUPPORTED = ("suffix", "logit_bias", "tools", "functions", "tool_choice")


def parse_logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(top-N log-probs or None, echo) from the completions API's `logprobs`/`echo` or the chat API's
    `logprobs`/`top_logprobs`."""
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise APIError(400, f"'logprobs' must be true or false, got {json.dumps(want)[:40]}", param="logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP)
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if want else None, False
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be true or false, got {json.dumps(echo)[:40]}", param="echo")
    return _integer(body, "logprobs", 0, MAX_TOP), bool(echo)


def parse_common(body: dict, prompts: list[list[int]], context_length: int, max_tokens_limit: int,
                 chat: bool = False) -> Job:
    for name in UNSUPPORTED + (("echo",) if chat else ()):  # refused rather than silently ignored
        if body.get(name) not in (None, False, {}, []):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "'best_of' other than 1 is not supported by this server", param="best_of",
                       code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(400, f"'{name}' is not supported by this server (only 0); use 'repetition_penalty' "
                           "(> 0, 1.0 = off) to discourage repeats", param=name, code="unsupported_parameter")
    try:
        schema = schema_of(body.get("response_format"))
    except FormatError as e:
        raise APIError(400, f"'response_format' {e}", param="response_format", code="invalid_response_format") from None
    temperature = _number(body, "temperature", DEFAULTS["temperature"], 0.0, 2.0)
    top_p = _number(body, "top_p", DEFAULTS["top_p"], 0.0, 1.0, lo_open=True)
    rep = _number(body, "repetition_penalty", DEFAULTS["repetition_penalty"], 0.0, 10.0, lo_open=True)
    logprobs, echo = parse_logprobs(body, chat)
    if echo and schema is not None:
        raise APIError(400, "'echo' cannot be combined with a JSON 'response_format'", param="response_format")
    max_tokens = _integer(body, "max_tokens", 0)
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' must be >= 1 (0 only with 'echo': true, to score the prompt)",
                       param="max_tokens")
    mct = _integer(body, "max_completion_tokens", 1)
    max_tokens = mct if mct is not None else max_tokens
    n = _integer(body, "n", 1, MAX_N) or 1
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    stops = body.get("stop")
    if stops is None:
        stops = []
    elif isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    longest = max(len(p) for p in prompts)
    room = context_length - longest
    if room < 1 and not (echo and max_tokens == 0):
        raise APIError(400, f"This model's maximum context length is {context_length} tokens; the prompt has "
                       f"{longest} tokens, leaving no room for a reply. Shorten the messages.",
                       param="messages", code="context_length_exceeded")
    max_new = min(max_tokens if max_tokens is not None else max_tokens_limit, room, max_tokens_limit)
    params = SamplingParams(max_new, temperature, top_p, rep, seed, logprobs, prompt_logprobs=echo, schema=schema)
    return Job(prompts, n, params, stops, stream, include_usage, logprobs, echo)


def _content_text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts "
                               "({\"type\": \"text\", \"text\": ...}) are supported", param=f"messages[{index}]")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages[{index}].content")


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {json.dumps(m.get('role'))[:40]} is not supported; allowed: "
                           "system, developer, user, assistant", param=f"messages[{i}].role")
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    return out


def parse_completion_prompts(body: dict, tokenizer: Tokenizer) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    p = body.get("prompt")
    bad = APIError(400, "'prompt' must be a string, a list of strings, or token id list(s)", param="prompt")
    if isinstance(p, str):
        texts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        texts = p
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [_check_ids(p, tokenizer)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        if not all(all(isinstance(t, int) and not isinstance(t, bool) for t in x) and x for x in p):
            raise bad
        return [_check_ids(x, tokenizer) for x in p]
    else:
        raise bad
    # hand-built ChatML prompts (as in the model card) keep their markers as control tokens
    return [tokenizer.encode_prompt(t) or [tokenizer.eot_id] for t in texts]


def _check_ids(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return ids
