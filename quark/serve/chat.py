"""`quark chat`: a multi-turn terminal chat over the engine, streaming each reply as it is generated.

Choices:
- The conversation is a list of {role, content} messages rendered by `Tokenizer.render_prompt` (the one
  ChatML renderer); a reply ends at <|im_end|>, which is never printed.
- Before each reply the oldest user/assistant turns are dropped until prompt + max_new_tokens fits the
  context; the user is told how many were dropped. The system prompt is always kept. If the newest message
  alone leaves less room than max_new_tokens, the reply is shortened to fit (and that is said too).
- Replies come from `quark.llm.LLM.stream_ids`: the same engine, driven in this thread, that `quark.load(...)`
  uses, so `llm.chat(messages, seed=S)` gives the tokens `quark chat --seed S` prints.
- Text is decoded incrementally, so a multi-byte character split across tokens is printed once, whole.
- Ctrl-C during a reply stops it (the partial reply stays in the conversation); at the prompt it quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from ..llm import LLM
from ..tokenizer import Tokenizer
from .engine import SamplingParams
from .text import IncrementalDecoder

HELP = """commands:
  /reset                 forget the conversation (keeps the system prompt)
  /system [TEXT]         show, or set, the system prompt (`/system -` removes it)
  /params [k=v ...]      show, or set, temperature, top_p, rep_penalty, max_new_tokens, seed (seed=none)
  /help                  this text
  /quit                  leave (Ctrl-D works too)"""

PARAM_TYPES = {"temperature": float, "top_p": float, "rep_penalty": float, "max_new_tokens": int, "seed": int}


def set_params(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """`["temperature=0.5", "seed=none"]` -> new params; ValueError naming the bad field."""
    changes = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq or key not in PARAM_TYPES:
            raise ValueError(f"expected key=value with key in {', '.join(PARAM_TYPES)}, got {a!r}")
        if key == "seed" and value.lower() in ("none", ""):
            changes[key] = None
            continue
        try:
            changes[key] = PARAM_TYPES[key](value)
        except ValueError:
            raise ValueError(f"{key} must be {PARAM_TYPES[key].__name__}, got {value!r}") from None
    new = replace(params, **changes)
    new.check()
    return new


def show_params(params: SamplingParams) -> str:
    return " ".join(f"{k}={getattr(params, k)}" for k in PARAM_TYPES)


class ChatSession:
    """The conversation state and the trimming rule, separate from terminal I/O (tested directly)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, system: str | None = None):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.system = system or None
        self.history: list[dict] = []

    def messages(self, extra: list[dict] = ()) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + list(extra)

    def prompt_for(self, user: str, max_new_tokens: int) -> tuple[list[int], int, int]:
        """(prompt ids, turns trimmed, max_new_tokens that fits). ValueError if the message alone cannot fit."""
        turn = [{"role": "user", "content": user}]
        trimmed = 0
        while True:
            ids = self.tokenizer.render_prompt(self.messages(turn))
            if len(ids) + max_new_tokens <= self.context_length or not self.history:
                break
            self._drop_oldest_turn()
            trimmed += 1
        room = self.context_length - len(ids)
        if room < 1:
            raise ValueError(f"this message is too long: the prompt needs {len(ids)} tokens and the context holds "
                             f"{self.context_length}; shorten it (or the system prompt)")
        return ids, trimmed, min(max_new_tokens, room)

    def _drop_oldest_turn(self) -> None:
        self.history.pop(0)  # a user message, then the assistant's reply to it (if any)
        while self.history and self.history[0]["role"] == "assistant":
            self.history.pop(0)

    def add_turn(self, user: str, reply: str) -> None:
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def run_chat(llm: LLM, params: SamplingParams, system: str | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> None:
    """The chat loop over `llm` (a `quark.llm.LLM`) until /quit or end of input."""
    params.check()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    context = llm._engine_for(1).context_length  # the model's context, as far as the KV cache budget allows
    session = ChatSession(llm.tokenizer, context, system)
    interactive = stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say(f"Quark chat with {llm.name} ({context}-token context). /help for commands, Ctrl-D to quit.")
    say(f"[{show_params(params)}]")
    while True:
        if interactive:
            say("you> ", end="")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            say()
            return
        if not line:
            return
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            params = _command(line, session, params, say)
            if params is None:
                return
            continue
        _reply(llm, session, line, params, say)


def _command(line: str, session: ChatSession, params: SamplingParams,
             say: Callable[..., None]) -> SamplingParams | None:
    """Run a /command; -> the (possibly changed) sampling params, or None for /quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return None
    elif cmd == "/help":
        say(HELP)
    elif cmd == "/reset":
        session.history = []
        say("[conversation cleared]")
    elif cmd == "/system":
        if arg:
            session.system = None if arg == "-" else arg
            say("[system prompt removed]" if arg == "-" else "[system prompt set]")
        else:
            say(f"[system prompt: {session.system!r}]")
    elif cmd == "/params":
        try:
            params = set_params(params, arg.split()) if arg else params
            say(f"[{show_params(params)}]")
        except ValueError as e:
            say(f"[error: {e}]")
    else:
        say(f"[unknown command {cmd}; /help lists them]")
    return params


def _reply(llm: LLM, session: ChatSession, line: str, params: SamplingParams, say: Callable[..., None]) -> None:
    """Stream the reply to one user message and add the turn to the conversation."""
    try:
        ids, trimmed, max_new = session.prompt_for(line, params.max_new_tokens)
    except ValueError as e:
        say(f"[error: {e}]")
        return
    if trimmed:
        say(f"[dropped the {trimmed} oldest turn(s) to fit the {session.context_length}-token context]")
    if max_new < params.max_new_tokens:
        say(f"[the reply is limited to {max_new} tokens to fit the context]")
    decoder, reply = IncrementalDecoder(llm.tokenizer), []
    say("quark> ", end="")
    tokens = llm.stream_ids(ids, replace(params, max_new_tokens=max_new))
    req = tokens.request
    try:
        for tok in tokens:
            piece = decoder.push(tok)
            if piece:
                reply.append(piece)
                say(piece, end="")
    except KeyboardInterrupt:
        tokens.close()
        reply.append(decoder.flush())
        say(reply[-1] + " [interrupted]")
    else:
        reply.append(decoder.flush())
        say(reply[-1])
        if req.finish_reason == "length":
            say(f"[reply cut at max_new_tokens={max_new}]")
    session.add_turn(line, "".join(reply))
