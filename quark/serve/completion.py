"""One HTTP request's choices while the engine runs them (quark/serve/server.py hands them over): each choice's engine
events turned into text (incremental detokenizing, stop strings, echo) and log-probs, then the response body or
its SSE chunks.

Choices:
- Engine events come sorted per request by the server's dispatcher, once per engine step; a stream drains every
  event already queued before writing, so a slow client gets fewer, larger SSE chunks.
- A choice's log-prob entries are sent with the text chunk that follows them (text held back by a stop string or
  a split UTF-8 character carries its entries when it comes); completions list the stop token's entry too (what
  lm-evaluation-harness counts on), chat lists the content's tokens only.
- The stream's generator cancels every open choice in its `finally` (a departed client frees its rows).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ..tokenizer import Tokenizer
from .api import APIError, Job
from .logprobs import chat_logprobs, completion_logprobs
from .text import IncrementalDecoder, StopMatcher


class Choice:
    def __init__(self, tokenizer: Tokenizer, stops: list[str], prompt: list[int], job: Job, chat: bool):
        self.decoder, self.stopper = IncrementalDecoder(tokenizer), StopMatcher(stops)
        self.req = None
        self.tokens, self.text, self.finish = 0, [], None
        self.prompt, self.echo, self.chat = prompt, job.echo, chat
        self.logprobs: list | None = None if job.logprobs is None else []  # entries (quark/serve/logprobs.py)
        self.sent_logprobs, self.logprob_chars = 0, 0  # entries already sent, and the characters they cover
        self.staged = None  # the entry of the token about to come

    def feed(self, kind: str, value: object) -> str:
        """One engine event -> newly visible text; sets `finish` when this choice is over."""
        if self.finish is not None:
            return ""
        if kind == "logprob":
            self.staged = value
            return ""
        if kind == "prompt_logprobs":  # echo: the prompt's text (and its log-probs) come first
            if self.logprobs is not None:
                self.logprobs += [(self.prompt[0], None, None), *value]
            text = self.decoder.tokenizer.decode(self.prompt)
            self.text.append(text)
            return text
        if self.staged is not None and self.logprobs is not None and (kind == "token" or not self.chat):
            self.logprobs.append(self.staged)  # completions list a stop token's too, as lm-eval expects
        self.staged = None
        if kind == "token":
            self.tokens += 1
            out = self.stopper.push(self.decoder.push(value))
            if self.stopper.stopped:
                self.finish = "stop"
                self.req.cancel()
        elif kind == "done":
            out = self.stopper.push(self.decoder.flush())
            out += self.stopper.flush()
            self.finish = "length" if value == "length" and not self.stopper.stopped else "stop"
        elif getattr(self.req, "engine_lost", False):  # its worker died: a new one is on its way
            raise APIError(503, f"generation failed: {value}; retry in a moment", type_="server_error",
                           code="engine_unavailable", retry_after=1)
        else:
            raise APIError(500, f"generation failed: {value}", type_="server_error", code="engine_error")
        self.text.append(out)
        return out


class Completion:
    """One HTTP request's choices while the engine runs them: their events, the response body or its SSE chunks."""

    def __init__(self, server: Any, job: Job, chat: bool):  # server.py's _Server: engine, dispatcher, tokenizer, name
        self.engine, self.dispatcher, self.job, self.chat = server.engine, server.dispatcher, job, chat
        self.tokenizer = server.tokenizer
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": server.model_name}

    def submit(self, seqs: int) -> None:
        """One engine request per choice; `seqs` reserved sequences are released for any not submitted."""
        job = self.job
        try:
            for prompt in job.prompts:
                for i in range(job.n):
                    c = Choice(self.tokenizer, job.stops, prompt, job, self.chat)
                    c.req = self.engine.submit(prompt, job.params_for(i),
                                               self.dispatcher.sink(self.events, len(self.choices)))
                    self.choices.append(c)
        except (ValueError, RuntimeError) as e:  # RuntimeError: the engine process is gone or restarting
            self.dispatcher.release(seqs - len(self.choices))  # the submitted ones release themselves as they finish
            for c in self.choices:
                self.engine.cancel(c.req)
            if isinstance(e, RuntimeError):
                raise APIError(503, str(e), type_="server_error", code="engine_unavailable", retry_after=1) from None
            raise APIError(400, str(e)) from None

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.job.prompts)
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    async def next_events(self) -> dict[int, tuple[str, str | None]]:
        """Wait for one event, then take all that are already queued: {choice: (text, finish or None)}."""
        batch = [await self.events.get()]
        while not self.events.empty():
            batch.append(self.events.get_nowait())
        out = {}
        for k, kind, value in batch:
            c = self.choices[k]
            was_open = c.finish is None
            text = c.feed(kind, value)
            if was_open:
                prev, _ = out.get(k, ("", None))
                out[k] = (prev + text, c.finish)
        return out

    def open_count(self) -> int:
        return sum(c.finish is None for c in self.choices)

    def cancel_all(self) -> None:
        for c in self.choices:
            if c.req.finish_reason is None:
                self.engine.cancel(c.req)

    async def whole(self, request: Request) -> dict | Response:
        """The non-streaming response, once every choice is over; 499 when the client leaves first."""
        try:
            checked = time.monotonic()
            while self.open_count():
                try:
                    await asyncio.wait_for(self.next_events(), timeout=0.25)
                except TimeoutError:  # only ever cancelled while waiting on the queue: nothing lost
                    pass
                if time.monotonic() - checked > 0.25:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # the client left: free its slots now
        finally:
            self.cancel_all()
        if self.chat:
            out = [{"index": k, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": self.logprobs(c), "finish_reason": c.finish} for k, c in enumerate(self.choices)]
        else:
            out = [{"index": k, "text": "".join(c.text), "logprobs": self.logprobs(c), "finish_reason": c.finish}
                   for k, c in enumerate(self.choices)]
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": out, "usage": self.usage()}

    def logprobs(self, c: Choice) -> dict | None:
        """The choice's log-probs not yet sent, in the endpoint's shape (None when the request asked for none)."""
        if c.logprobs is None:
            return None
        new = c.logprobs[c.sent_logprobs:]
        c.sent_logprobs = len(c.logprobs)
        if self.chat:
            return chat_logprobs(self.tokenizer, new)
        out = completion_logprobs(self.tokenizer, new, c.logprob_chars)  # a stream's offsets go on chunk to chunk
        c.logprob_chars += sum(len(t) for t in out["tokens"])
        return out

    def chunk(self, k: int, text: str | None, finish: str | None, role: bool = False) -> str:
        lps = None if role else self.logprobs(self.choices[k])
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": k, "delta": delta, "logprobs": lps, "finish_reason": finish}
        else:
            choice = {"index": k, "text": text or "", "logprobs": lps, "finish_reason": finish}
        payload = {**self.head, "choices": [choice]}
        if self.job.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """The SSE stream: a role chunk per choice (chat), text chunks as they come, finish chunks, usage, [DONE]."""
        try:
            if self.chat:
                for k in range(len(self.choices)):
                    yield self.chunk(k, None, None, role=True)
            while self.open_count():
                try:
                    batch = await self.next_events()
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                for k, (text, finish) in batch.items():
                    if text:
                        yield self.chunk(k, text, None)
                    if finish is not None:
                        yield self.chunk(k, None, finish)
            if self.job.include_usage:
                yield f"data: {json.dumps({**self.head, 'choices': [], 'usage': self.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel_all()
