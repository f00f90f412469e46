"""Structured output on a real model: validity of constrained JSON, and batch-8 decode throughput with a schema
against without, in the same run.

    python bench/structured.py --model /tmp/smol_q [--max-tokens 256] [--batch 8]

50 varied prompts (10 per schema of bench/schemas.py: nested objects, arrays, enums, bounded numbers, required
fields) run through the serving engine (quark/serve/engine.py, `--batch` rows at a time, the card's sampling)
with `response_format` json_schema; every reply must parse and validate (jsonschema). The same prompts then run
without a schema, and each mode's throughput is generated tokens per second of engine time; the two alternate
`--rounds` times so a change in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from schemas import SCHEMAS  # noqa: E402

SUBJECTS = {
    "person": ["a retired sailor", "a young chess champion", "a baker from Naples", "an astronaut", "a poet",
               "a nurse in Oslo", "a violin teacher", "a farmer in Kenya", "a software tester", "a museum guide"],
    "recipe": ["pancakes", "a tomato soup", "guacamole", "a lemon cake", "fried rice", "a Greek salad",
               "banana bread", "a mushroom risotto", "hummus", "an omelette"],
    "review": ["a cheap phone", "a noisy hotel", "a great pizza place", "a slow laptop", "a boring film",
               "a comfy pair of shoes", "an e-book reader", "a rainy holiday", "a coffee machine", "a museum visit"],
    "event": ["a book club meeting", "a summer concert", "a Python workshop", "a charity run", "a wedding",
              "a chess tournament", "a science fair", "a film night", "a hackathon", "a farmers' market"],
    "inventory": ["a small bookshop", "a bike repair shop", "a pharmacy", "a toy store", "a bakery",
                  "a hardware store", "a flower shop", "a grocery", "a music store", "a pet shop"],
}


def prompts() -> list[tuple[str, list[dict]]]:
    out = []
    for name, subjects in SUBJECTS.items():
        for s in subjects:
            out.append((name, [{"role": "system", "content": "You answer with a single JSON object."},
                               {"role": "user", "content": f"Describe {s} as a JSON {name} record."}]))
    return out


def run(engine, llm, items, schema: bool, max_tokens: int) -> tuple[list[str], int, float]:
    """Replies, tokens generated and engine seconds for all items, `engine.max_batch` rows at a time."""
    reqs = []
    before = engine.stats["busy_s"]
    for name, msgs in items:
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}} if schema else None
        params = llm.params(max_new_tokens=max_tokens, **({"response_format": fmt} if fmt else {}))
        reqs.append(engine.submit(llm.chat_ids(msgs), params))
    outs = [list(engine.iter_tokens(r)) for r in reqs]
    busy = engine.stats["busy_s"] - before
    return [llm.tokenizer.decode(o) for o in outs], sum(len(o) for o in outs), busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    import jsonschema

    import quark
    from quark.serve.engine import Engine

    llm = quark.load(args.model)
    engine = Engine(llm.model, llm.tokenizer.stop_ids, max_batch=args.batch, tokenizer=llm.tokenizer,
                    prefix_cache_mb=0)  # no prefix reuse: both modes prefill alike
    items = prompts()
    run(engine, llm, items[:args.batch], True, 16)  # warm-up: grammar tables, compiled steps
    run(engine, llm, items[:args.batch], False, 16)
    figures = {True: [0, 0.0], False: [0, 0.0]}
    valid, failures = 0, []
    for _ in range(args.rounds):
        for schema in (True, False):
            texts, tokens, busy = run(engine, llm, items, schema, args.max_tokens)
            figures[schema][0] += tokens
            figures[schema][1] += busy
            if schema:
                for (name, _), text in zip(items, texts):
                    try:
                        jsonschema.validate(json.loads(text), SCHEMAS[name])
                        valid += 1
                    except (ValueError, jsonschema.ValidationError) as e:
                        failures.append(f"{name}: {str(e)[:80]} in {text[:120]!r}")
    n = len(items) * args.rounds
    with_s, without = (figures[m][0] / figures[m][1] for m in (True, False))
    print(f"model {Path(args.model).name} | {len(items)} prompts x {args.rounds} round(s), {len(SCHEMAS)} schemas, "
          f"batch {args.batch}, card sampling, max_tokens {args.max_tokens}")
    print(f"valid JSON that validates against its schema: {valid} of {n} ({100 * valid / n:.0f}%)")
    for f in failures[:5]:
        print("  FAILED", f)
    print(f"decode throughput: with a schema {with_s:.1f} tok/s ({figures[True][0]} tokens), without "
          f"{without:.1f} tok/s ({figures[False][0]} tokens): {with_s / without:.2f}x (target >= 0.8x)")
    return 0 if valid == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
