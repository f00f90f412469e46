"""The continuous-batching inference engine shared by the server and the terminal chat.

Choices:
- One owner: a single thread (or the caller, for the chat) runs `step()`; other threads only `submit()` and
  `cancel()`, which touch a lock-protected queue. The model and the KV cache are never shared.
- One preallocated cache with `max_batch` rows of `context_length` slots, owned by the model's decoder
  (`quark.generate.make_decoder`: quark/fast.py's FastDecoder with fused weights and on CUDA its captured
  CUDA-graph step, or the reference `Decoder` for a model the fast path does not take: `QUARK_FAST=0`, an
  overridden forward/hidden), through its per-row methods `prefill_rows`, `step`, `move_row`. Active sequences are kept
  compact in rows 0..n-1 (a finished row is filled by moving the last one into it), so each decode step runs
  exactly n rows, each at its own position (per-row slots `lengths[:n]`). A row's stale slots from an
  earlier occupant are never read: a query only sees slots at or before its own position, and every such
  slot was written by this sequence.
- New requests join between decode steps: they are prefilled together (right-padded, straight into their
  cache rows; the padding slots get overwritten before they are ever visible), sample their first token
  from the prefill, and join the very next batched decode step. Prefill is bounded by `prefill_tokens`
  per step so a burst of long prompts cannot stall running streams for long. While other rows are decoding,
  a lone arrival waits up to `admit_wait_steps` decode steps for company (until `admit_batch` requests, or
  all free slots, are waiting), as TGI's `max_waiting_tokens` does: a prefill pass has a fixed cost (on CPU
  about what a short prompt's compute costs), so admitting arrivals in groups keeps more of the engine's time
  for decoding; an idle engine admits at once.
- Prefix cache (quark/serve/prefix_cache.py, `prefix_cache_mb`, 0 = off): at admission a prompt's longest cached
  run of full blocks is copied into its row and only the rest is prefilled (`prefill_rows` with per-row start
  slots, attending over the copied slots); a prompt's blocks are kept once prefilled, a row's prompt + reply when
  it retires. A request whose next `DEFER_BLOCKS` blocks a request admitted with it computes waits one step and
  reuses them. Greedy tokens are the same with and without it (tests/test_serve_features.py).
- Structured output (a request's `schema`): the row's xgrammar matcher checks each sampled token; a refused one is
  sampled again from the masked logits (quark/serve/grammar.py). The repetition penalty spares the row's JSON
  delimiter tokens (a quote, comma, colon, brace or bracket), which the JSON must repeat.
- Rows are grouped by (temperature, top_p, rep_penalty) and sampled together with the engine's generator. A
  request with a `seed` gets its own generator and is sampled alone by `quark.sampling.sample_next`, so its
  tokens are those of `generate(..., seed=seed)` whatever else is in the batch. Unseeded groups use quark/sampling.py
  `nucleus_sample`: the same distribution as `sample_next` (same repetition penalty, temperature, top-p set and
  NaN guard) without its full-vocabulary `torch.sort` and `multinomial`, which on CPU cost ~250 ms and ~120 ms
  per step at 32 x 65,538 logits (more than the model): it draws by inverse CDF and rejects draws outside the
  top-p set (see its docstring).
- A cancelled request (client gone) leaves the batch at the next step boundary; its slot is free at once.
- Events go to each request's `sink(kind, value)`: ("token", id), then one ("done", "stop"|"length"|
  "cancelled") or ("error", message). Stop tokens (<|im_end|>, <|endoftext|>) end a reply and are not sent.
  A request with `logprobs` also gets ("logprob", entry) before each token, and before the stop token that ends
  it (so a scorer sees every sampled token); with `prompt_logprobs`, ("prompt_logprobs", entries) first (see
  quark/serve/logprobs.py). Only "done" and "error" end a request.
- Prompt log-probs (echo) come from the model's own forward over the prompt, as `quark eval` scores
  (quark/serve/logprobs.py): a request for at most one new token (lm-eval's scoring requests: echo, logprobs,
  max_tokens 0 or 1) is answered from that forward alone and never takes a cache row.
  `after_step` callbacks run once per step, so a consumer can hand a whole step's events on in one go.
- The repetition penalty touches only the seen tokens: each row's tokens so far (prompt + output) are kept in
  `hist` (B, context + 1), and the penalty is a gather/scatter over them, the same arithmetic as
  `apply_rep_penalty` without three passes over the whole (B, V) logits.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..config import QuarkConfig
from ..generate import _device_dtype, check_prompts, make_decoder
from ..model import Quark
from ..sampling import RECOMMENDED, check_sampling_args, nucleus_sample, rep_penalty_ids, sample_next
from ..tokenizer import Tokenizer
from .grammar import Grammars
from .logprobs import MAX_TOP, entries, score_prompts
from .prefix_cache import BLOCK, DEFAULT_MB, PrefixCache

DEFER_BLOCKS = 4  # a request waits a step to reuse the prefix of one admitted with it when they share this many


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling; the defaults are the card's recommended settings (`quark.sampling.RECOMMENDED`)."""
    max_new_tokens: int = RECOMMENDED["max_new_tokens"]
    temperature: float = RECOMMENDED["temperature"]
    top_p: float = RECOMMENDED["top_p"]
    rep_penalty: float = RECOMMENDED["rep_penalty"]
    seed: int | None = None
    logprobs: int | None = None  # None: none; N: each sampled token's log-prob and the N likeliest (0..MAX_TOP)
    prompt_logprobs: bool = False  # also the prompt's own tokens' log-probs (echo), `logprobs` likeliest each
    schema: str | None = None  # a JSON schema the reply must follow (quark/serve/grammar.py `schema_of`)

    def check(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.rep_penalty, self.max_new_tokens)
        if self.max_new_tokens < (0 if self.prompt_logprobs else 1):
            raise ValueError(f"max_new_tokens must be >= 1 (0 only to score a prompt), got {self.max_new_tokens}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP}], got {self.logprobs!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def check_request(prompt: Sequence[int], params: SamplingParams, vocab_size: int, context_length: int) -> None:
    """ValueError unless the request can run: valid params, a non-empty prompt of ids in range, and prompt +
    max_new_tokens within the context."""
    params.check()
    check_prompts([prompt], params.max_new_tokens, vocab_size, context_length)


class Request:
    """One sequence to generate. Thread-safe to `cancel()` from anywhere."""

    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[str, object], None] | None):
        self.id = next(self._ids)
        self.prompt = list(prompt)
        self.params = params
        self.events: queue.SimpleQueue | None = None
        if sink is None:
            self.events = queue.SimpleQueue()
            sink = lambda kind, value: self.events.put((kind, value))  # noqa: E731
        self.sink = sink
        self.cancelled = False
        self.finish_reason: str | None = None
        self.n_generated = 0
        self.submitted = time.perf_counter()
        self.block_keys: list[int] | None = None  # the prompt's prefix-cache keys, once computed

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    __slots__ = ("req", "length", "generator", "matcher")

    def __init__(self, req: Request, generator: torch.Generator | None, matcher: object = None):
        self.req, self.length, self.generator, self.matcher = req, len(req.prompt), generator, matcher


KV_CACHE_MB = 4096  # the default budget of the preallocated KV cache (all rows)


def kv_context(cfg: QuarkConfig, rows: int, max_context: int | None, kv_cache_mb: float, itemsize: int) -> int:
    """Slots per row of the engine's cache: the model's context, or `max_context` if smaller, cut (to a multiple
    of 64) so that `rows` rows of keys and values fit `kv_cache_mb`. A model with a long context (SmolLM2: 8,192
    tokens, 46 KiB a token in fp32) would otherwise preallocate 12 GB at 32 rows."""
    if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
        raise ValueError(f"max_context must be an integer >= 1, got {max_context!r}")
    if not kv_cache_mb > 0:
        raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb!r}")
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    want = min(cfg.context_length, max_context or cfg.context_length)
    fit = int(kv_cache_mb * 2**20) // (rows * per_token) // 64 * 64
    if fit < min(want, 64):
        raise ValueError(f"a KV cache of {kv_cache_mb:g} MB holds {fit} tokens per sequence at {rows} sequences "
                         f"({per_token / 1024:.0f} KiB a token); raise the KV cache budget (--kv-cache-mb) or lower "
                         "--max-batch")
    return min(want, fit)


class Engine:
    """Continuous batching over one model. Use `start()` for a background thread, or call `step()` yourself."""

    state = "ok"  # as `ProcessEngine.state`; a failed step fails only its requests, so this engine stays "ok"

    def __init__(self, model: Quark, stop_ids: Sequence[int], *, max_batch: int = 32, prefill_tokens: int = 4096,
                 seed: int | None = None, admit_batch: int = 4, admit_wait_steps: int = 4,
                 prefix_cache_mb: float = DEFAULT_MB, tokenizer: Tokenizer | None = None,
                 max_context: int | None = None, kv_cache_mb: float = KV_CACHE_MB):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model.eval()
        cfg = model.config
        self.context_length = kv_context(cfg, max_batch, max_context, kv_cache_mb, _device_dtype(model)[1].itemsize)
        self.vocab_size = cfg.vocab_size
        self.stop_ids = {int(i) for i in stop_ids}
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.admit_batch, self.admit_wait_steps = admit_batch, admit_wait_steps
        self._waited = 0  # decode steps the oldest waiting request has waited
        self.device = model.device  # the norms' device, also after int8 weight quantization
        self.dec = make_decoder(model, max_batch, self.context_length)  # CUDA: a captured graph decoder
        self.dec.busy = True  # the engine owns it for good: generate() calls get their own decoders
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0: no prefix cache), got {prefix_cache_mb!r}")
        self.prefix = PrefixCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.dec.dtype, self.device,
                                  int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self._now = False  # admit the next waiting request without waiting for company (see _admit)
        self.tokenizer, self._grammars = tokenizer, None  # structured output: built at its first request
        self.seen = torch.zeros(max_batch, cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.hist = torch.zeros(max_batch, self.context_length + 1, dtype=torch.long, device=self.device)
        self.last_tok = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**62))
        self.rows: list[_Row] = []
        self.pending: deque[Request] = deque()
        self._admitting: list[Request] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.running = False
        self.after_step: list[Callable[[], None]] = []
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "peak_batch": 0, "row_steps": 0, "errors": 0,
                      "busy_s": 0.0}

    # ---- the public, thread-safe side ------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams,
               sink: Callable[[str, object], None] | None = None) -> Request:
        """Queue a prompt. ValueError if it cannot run (empty, bad ids, prompt + max_new_tokens > context)."""
        check_request(prompt, params, self.vocab_size, self.context_length)
        if params.schema is not None and self.tokenizer is None:
            raise ValueError("structured output (a schema) needs an engine built with its tokenizer")
        req = Request(prompt, params, sink)
        with self.lock:
            self.pending.append(req)
        self.wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        self.wake.set()

    def start(self) -> Engine:
        if self.thread is None:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="quark-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.running = False
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None

    def load(self) -> dict:
        with self.lock:
            pending = len(self.pending)
        out = {"active": len(self.rows), "pending": pending, "max_batch": self.max_batch, **self.stats}
        if self.prefix is not None:
            out["prefix_cache"] = self.prefix.stats()
        return out

    def iter_tokens(self, req: Request) -> Iterator[int]:
        """Token ids of a request submitted without a sink, as they come; drives `step()` itself when no
        engine thread runs. Closing the iterator early cancels the request."""
        try:
            while True:
                if self.thread is None:
                    while req.events.empty():
                        self.step()
                kind, value = req.events.get()
                if kind == "token":
                    yield value
                elif kind in ("logprob", "prompt_logprobs"):
                    continue
                elif kind == "error":
                    raise RuntimeError(f"generation failed: {value}")
                else:
                    return
        finally:
            if req.finish_reason is None:
                self.cancel(req)
                if self.thread is None:
                    self.step()

    # ---- the engine side ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self.running:
            if not self.step():
                self.wake.wait(0.05)
                self.wake.clear()

    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, then run one batched decode step. Returns False when there was nothing to do."""
        t0 = time.perf_counter()
        try:
            self._drop_cancelled()
            admitted = self._admit()
            if not self.rows:
                return admitted
            self._decode()
            return True
        except Exception as e:
            return self._fail_all(e)
        finally:
            self.stats["busy_s"] += time.perf_counter() - t0
            for hook in self.after_step:
                hook()

    def _fail_all(self, e: Exception) -> bool:
        """Keep serving after a failed step: fail what was in flight, free every slot."""
        self.stats["errors"] += 1
        failed = {r.req.id: r.req for r in self.rows} | {r.id: r for r in self._admitting}
        for req in failed.values():
            if req.finish_reason is None:
                self._finish_event(req, "error", f"{type(e).__name__}: {e}")
        self.rows, self._admitting = [], []
        return True

    def _finish_event(self, req: Request, kind: str, value: str) -> None:
        req.finish_reason = value if kind == "done" else "error"
        req.sink(kind, value)

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.req.cancelled]
        for i in gone:
            self._finish_event(self.rows[i].req, "done", "cancelled")
        self._free(gone)

    def _admit(self) -> bool:
        new: list[Request] = []
        with self.lock:
            if not self.pending:
                self._waited = 0
                return False
            if self.rows and not self._now and len(self.pending) < min(self.admit_batch,
                                                                        self.max_batch - len(self.rows)):
                self._waited += 1
                if self._waited <= self.admit_wait_steps:
                    return False  # decode on; a few more arrivals will share one prefill pass
            self._waited, self._now = 0, False
            budget = self.prefill_tokens
            coming: set[int] = set()  # prefix-cache blocks the requests admitted so far will add
            while self.pending and len(self.rows) + len(new) < self.max_batch:
                req = self.pending[0]
                if req.cancelled:
                    self.pending.popleft()
                    self._finish_event(req, "done", "cancelled")
                    continue
                longest = max([len(r.prompt) for r in new] + [len(req.prompt)])
                if new and longest * (len(new) + 1) > budget:
                    break
                if self.prefix is not None and not req.params.prompt_logprobs:
                    if self._shares_with(req, coming):
                        self._now = True  # next step, once the earlier one's blocks are in
                        break
                    coming.update(req.block_keys)
                new.append(self.pending.popleft())
        if not new:
            return False
        self._admitting = new
        self._prefill(new)
        self._admitting = []
        return True

    def _shares_with(self, req: Request, coming: set[int]) -> bool:
        """Whether the next `DEFER_BLOCKS` blocks `req` would compute are ones a request admitted with it computes
        too: then it waits a step and reuses them (prefix caching within a batch). A shorter shared run is not
        worth the step: a prefill pass has a fixed cost."""
        if req.block_keys is None:
            req.block_keys = PrefixCache.keys(req.prompt)
        end = len(self.prefix.match(req.prompt, req.block_keys)) + DEFER_BLOCKS  # a chain: the last one says all
        return end <= (len(req.prompt) - 1) // BLOCK and req.block_keys[end - 1] in coming

    def _prefill(self, reqs: list[Request]) -> None:
        scored = [r for r in reqs if r.params.prompt_logprobs]
        if scored:
            self._score(scored)
            reqs = [r for r in reqs if not r.params.prompt_logprobs or r.params.max_new_tokens > 1]
            if not reqs:
                return
        n0, m = len(self.rows), len(reqs)
        offsets = [0] * m  # prompt tokens whose K/V the prefix cache gives
        if self.prefix is not None:
            for j, r in enumerate(reqs):
                r.block_keys = r.block_keys or PrefixCache.keys(r.prompt)
                found = self.prefix.lookup(r.prompt, r.block_keys)
                if found:
                    self.prefix.copy_in(found, self.dec.cache, n0 + j)
                    offsets[j] = len(found) * BLOCK
        T = max(len(r.prompt) - o for r, o in zip(reqs, offsets))
        idx = torch.zeros(m, T, dtype=torch.long)
        for j, (r, o) in enumerate(zip(reqs, offsets)):
            idx[j, :len(r.prompt) - o] = torch.tensor(r.prompt[o:])
        lengths = torch.tensor([len(r.prompt) - o for r, o in zip(reqs, offsets)], device=self.device)
        if any(offsets):
            logits = self.dec.prefill_rows(idx.to(self.device), lengths, n0, torch.tensor(offsets, device=self.device),
                                           max(len(r.prompt) for r in reqs))
        else:
            logits = self.dec.prefill_rows(idx.to(self.device), lengths, n0)  # (m, V)
        if self.prefix is not None:
            for j, r in enumerate(reqs):
                self.prefix.insert(r.prompt, self.dec.cache, n0 + j, r.block_keys)
        for j, r in enumerate(reqs):
            gen = None
            if r.params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(r.params.seed)
            self.rows.append(_Row(r, gen, None if r.params.schema is None else self._grammar().matcher(r.params.schema)))
            prompt = torch.tensor(r.prompt, device=self.device)
            self.seen[n0 + j] = False
            self.seen[n0 + j, prompt] = True
            self.hist[n0 + j] = r.prompt[0]  # padding repeats a seen token: harmless in gather/scatter
            self.hist[n0 + j, :len(r.prompt)] = prompt
            self.lengths[n0 + j] = len(r.prompt)
        self.stats["requests"] += m
        self._sample_and_emit(logits, first=n0)

    def _score(self, reqs: list[Request]) -> None:
        """Prompt log-probs (echo), through the model's own forward as `quark eval` scores. A request for at most
        one new token is then done without a cache row: its token comes from the same forward."""
        scores, last = score_prompts(self.model, [r.prompt for r in reqs], [r.params.logprobs or 0 for r in reqs])
        for j, r in enumerate(reqs):
            r.sink("prompt_logprobs", scores[j])
            p = r.params
            if p.max_new_tokens > 1:
                continue  # prefilled into a row next, as any request
            self.stats["requests"] += 1
            if p.max_new_tokens == 0:
                self._finish_event(r, "done", "length")
                continue
            gen = self.generator if p.seed is None else torch.Generator(device=self.device).manual_seed(p.seed)
            seen = None
            if p.rep_penalty != 1.0:
                seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
                seen[0, torch.tensor(r.prompt, device=self.device)] = True
            t = int(sample_next(last[j:j + 1], seen, p.temperature, p.top_p, p.rep_penalty, gen)[0])
            r.sink("logprob", entries(last[j:j + 1], torch.tensor([t]), p.logprobs or 0)[0])
            if t in self.stop_ids:
                self._finish_event(r, "done", "stop")
            else:
                r.n_generated += 1
                self.stats["tokens"] += 1
                r.sink("token", t)
                self._finish_event(r, "done", "length")

    def _grammar(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, sorted(self.stop_ids), self.device)
        return self._grammars

    def _constrain(self, tok: torch.Tensor, raw: torch.Tensor, rows: list[_Row], first: int) -> None:
        """Rows with a grammar: keep a sampled token the grammar accepts, else sample again from the masked
        logits `raw` (n, V) (quark/serve/grammar.py: the same distribution as masking first)."""
        for i, row in enumerate(rows):
            if row.matcher is None or row.matcher.accept_token(int(tok[i])):
                continue
            masked = self._grammar().mask(raw[i:i + 1], [row.matcher])
            tok[i] = self._sample_group(masked, [row], torch.tensor([first + i], device=self.device))[0]
            if not row.matcher.accept_token(int(tok[i])):  # nothing allowed (cannot happen with a stop token)
                tok[i] = min(self.stop_ids)

    def _decode(self) -> None:
        n = len(self.rows)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], n)
        n_keys = max(row.length for row in self.rows) + 1  # known here: the decoder need not ask the device
        logits = self.dec.step(self.last_tok[:n], self.lengths[:n], n_keys)  # (n, V)
        for row in self.rows:
            row.length += 1
        self.lengths[:n] += 1
        self.stats["steps"] += 1
        self.stats["row_steps"] += n
        self._sample_and_emit(logits, first=0)

    def _sample(self, logits: torch.Tensor, rows: list[_Row], first: int) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.req.params
            key = (p.temperature, p.top_p, p.rep_penalty) if row.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:  # the common case: one batched call, no gathers
            return self._sample_group(logits, rows, slice(first, first + len(rows)))
        out = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for members in groups.values():
            ix = torch.tensor(members, device=self.device)
            out[ix] = self._sample_group(logits[ix], [rows[i] for i in members], ix + first)
        return out

    def _sample_group(self, logits: torch.Tensor, rows: list[_Row], where: slice | torch.Tensor) -> torch.Tensor:
        """Rows with the same params; `where` selects their engine rows (a slice or an index tensor)."""
        p = rows[0].req.params
        spare = self._structure(rows) if p.rep_penalty != 1.0 else None
        if rows[0].generator is not None or p.temperature == 0.0:
            seen = self.seen[where] if p.rep_penalty != 1.0 else None
            if spare is not None:
                seen = seen & ~spare
            return sample_next(logits, seen, p.temperature, p.top_p, p.rep_penalty, rows[0].generator)
        if p.rep_penalty != 1.0:
            n_seen = max(r.length for r in rows) + 1  # the newest token sits at index `length`
            penalized = rep_penalty_ids(logits.float(), self.hist[where, :n_seen], p.rep_penalty)
            logits = penalized if spare is None else torch.where(spare, logits.float(), penalized)
        return nucleus_sample(logits, p.temperature, p.top_p, self.generator)

    def _structure(self, rows: list[_Row]) -> torch.Tensor | None:
        """(n, V) True at the JSON delimiter tokens of rows with a grammar, which the repetition penalty spares: a
        JSON reply repeats its quotes, commas and braces, and penalizing them keeps strings from closing."""
        if all(row.matcher is None for row in rows):
            return None
        has = torch.tensor([row.matcher is not None for row in rows], device=self.device)
        return has[:, None] & self._grammar().structural[None]

    def _sample_and_emit(self, logits: torch.Tensor, first: int) -> None:
        """Sample for rows first..end, send the tokens, retire finished rows."""
        rows = self.rows[first:]
        asked = [i for i, row in enumerate(rows) if row.req.params.logprobs is not None]
        if asked:
            ix = torch.tensor(asked, device=self.device)
            raw = logits[ix]
        tok = self._sample(logits, rows, first)  # sampling never writes into `logits`
        if any(row.matcher is not None for row in rows):
            self._constrain(tok, logits, rows, first)
        if asked:
            for i, e in zip(asked, entries(raw, tok[ix], max(rows[i].req.params.logprobs for i in asked))):
                top = e[2][:rows[i].req.params.logprobs]
                rows[i].req.sink("logprob", (e[0], e[1], top))
        n = len(rows)
        at = torch.arange(first, first + n, device=self.device)
        self.seen[at, tok] = True
        self.hist[at, self.lengths[first:first + n]] = tok
        self.last_tok[first:first + n] = tok
        done = []
        for i, (row, t) in enumerate(zip(rows, tok.tolist())):
            req = row.req
            if req.cancelled:
                self._finish_event(req, "done", "cancelled")
            elif t in self.stop_ids:
                self._finish_event(req, "done", "stop")
            else:
                req.n_generated += 1
                self.stats["tokens"] += 1
                req.sink("token", t)
                if req.n_generated < req.params.max_new_tokens:
                    continue
                self._finish_event(req, "done", "length")
            done.append(first + i)
        self._free(done)

    def _free(self, indices: list[int]) -> None:
        """Retire rows, keeping the active rows compact: the last row moves into each hole."""
        for i in sorted(indices, reverse=True):
            if self.prefix is not None:  # prompt + reply: a chat's next turn starts with them
                self.prefix.insert(self.hist[i, :self.rows[i].length].tolist(), self.dec.cache, i)
            last = len(self.rows) - 1
            if i != last:
                self.dec.move_row(last, i, self.rows[last].length)
                self.seen[i] = self.seen[last]
                self.hist[i] = self.hist[last]
                self.last_tok[i] = self.last_tok[last]
                self.lengths[i] = self.lengths[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
