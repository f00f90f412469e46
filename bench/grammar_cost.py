"""Per-token CPU cost of constraining decoding with a JSON schema, xgrammar vs llguidance, on a model's vocabulary.

    python bench/grammar_cost.py --model /tmp/smol_q [--reps 3]

For each engine and batch size (1 and 8): compile the five schemas of bench/schemas.py, then walk each row's
matcher through the tokens of a valid document (json.dumps of the schema's example), and per step fill the
next-token bitmask of every row, apply it to (batch, vocab) fp32 logits and advance each matcher by its token:
exactly the work a serving engine adds per decode step. Prints compile time (the tokenizer tables, built once
per server, left out) and microseconds per step (and per row-token), the median of --reps walks after a warm-up. The model itself is not run: its step is the same with or without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from schemas import EXAMPLES, SCHEMAS  # noqa: E402

_TOKENIZERS: dict = {}


def docs(tokenizer, batch: int) -> list[tuple[str, list[int]]]:
    names = list(SCHEMAS)
    return [(names[i % len(names)], tokenizer.encode(json.dumps(EXAMPLES[names[i % len(names)]])))
            for i in range(batch)]


def xgrammar_walk(tokenizer, vocab: int, rows: list[tuple[str, list[int]]]) -> tuple[float, float, int]:
    import xgrammar as xgr

    from quark.serve.logprobs import token_bytes

    if "xgrammar" not in _TOKENIZERS:  # once per server
        info = xgr.TokenizerInfo([token_bytes(tokenizer, i) for i in range(tokenizer.vocab_size)],
                                 xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=tokenizer.stop_ids)
        _TOKENIZERS["xgrammar"] = xgr.GrammarCompiler(info, cache_enabled=False)
    compiler = _TOKENIZERS["xgrammar"]
    t0 = time.perf_counter()
    grammars = {n: compiler.compile_json_schema(json.dumps(s)) for n, s in SCHEMAS.items()}
    compile_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(grammars[n]) for n, _ in rows]
    mask = xgr.allocate_token_bitmask(len(rows), vocab)
    logits = torch.randn(len(rows), vocab)
    steps = max(len(t) for _, t in rows)
    batch = xgr.BatchGrammarMatcher() if len(rows) > 1 else None
    t0 = time.perf_counter()
    for s in range(steps):
        if batch is None:
            matchers[0].fill_next_token_bitmask(mask, 0)
        else:
            batch.batch_fill_next_token_bitmask(matchers, mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        for (_, toks), m in zip(rows, matchers):
            if s < len(toks):
                assert m.accept_token(toks[s]), "a valid document was refused"
    return compile_s, time.perf_counter() - t0, steps


def llguidance_walk(tokenizer, vocab: int, rows: list[tuple[str, list[int]]]) -> tuple[float, float, int]:
    import llguidance
    import llguidance.torch as lt

    if "llguidance" not in _TOKENIZERS:  # once per server
        _TOKENIZERS["llguidance"] = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab,
                                                           eos_token=tokenizer.stop_ids[0])
    lltok = _TOKENIZERS["llguidance"]
    t0 = time.perf_counter()
    grammars = {n: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(s)) for n, s in SCHEMAS.items()}
    matchers = [llguidance.LLMatcher(lltok, grammars[n]) for n, _ in rows]
    compile_s = time.perf_counter() - t0
    executor = llguidance.LLExecutor()
    mask = lt.allocate_token_bitmask(len(rows), vocab)
    logits = torch.randn(len(rows), vocab)
    steps = max(len(t) for _, t in rows)
    t0 = time.perf_counter()
    for s in range(steps):
        lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        lt.apply_token_bitmask_inplace(logits, mask)
        for (_, toks), m in zip(rows, matchers):
            if s < len(toks):
                assert m.consume_token(toks[s]), f"a valid document was refused: {m.get_error()}"
    return compile_s, time.perf_counter() - t0, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model folder (its tokenizer and vocabulary size are used)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from quark.weights import config_from_folder, load_tokenizer_for

    tokenizer, vocab = load_tokenizer_for(args.model), config_from_folder(args.model).vocab_size
    print(f"vocabulary {vocab} | torch threads {torch.get_num_threads()}")
    print(f"{'engine':11s} {'batch':>5s} {'compile (5 schemas)':>18s} {'us / step':>10s} {'us / row-token':>15s}")
    for name, walk in (("xgrammar", xgrammar_walk), ("llguidance", llguidance_walk)):
        for batch in (1, 8):
            rows = docs(tokenizer, batch)
            walk(tokenizer, vocab, rows)  # warm-up: the engine's per-tokenizer tables are built on first use
            runs = [walk(tokenizer, vocab, rows) for _ in range(args.reps)]
            compile_s = statistics.median(r[0] for r in runs)
            per_step = statistics.median(r[1] / r[2] for r in runs)
            print(f"{name:11s} {batch:5d} {compile_s * 1e3:16.0f}ms {per_step * 1e6:10.0f} "
                  f"{per_step / batch * 1e6:15.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
