"""The speedrun's report: `RUN/report.md` and `RUN/summary.json`, every figure read from the files the stages wrote
(manifests, run.json, eval JSON, the arith results, the exported model card, which it embeds), never typed by hand.

Choices:
- The validation loss sits beside the unigram baseline of the same data (the best context-free model), so "the
  model learned something" is a number; the SFT model's loss on the same pre-training validation data says what
  SFT cost.
- `arith` (held-out generated arithmetic) is summarised per difficulty over all modules and for add_or_sub, the
  easiest skill, beside the multiple-choice table; the full module x difficulty table is in RUN/eval/arith-*.md.
- The sample chats are generated here, through `quark.load`, with the card's recommended sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from .sampling import RECOMMENDED
from .speedrun import STAGES, Run, _fmt_s, _show, stage_commands

SAMPLE_CHATS = [  # the report's sample conversations, English and Italian
    ("en", "Hello! How are you today?"),
    ("en", "What is 7 plus 5?"),
    ("en", "Write a Python function that returns the square of a number."),
    ("it", "Ciao! Come stai?"),
    ("it", "Qual è la capitale d'Italia?"),
    ("it", "Che cos'è un file di configurazione?"),
]


def unigram_baseline(data_dir: Path) -> dict:
    """Cross-entropy on the val split of the best context-free model: train-split token frequencies (add-one
    smoothed). A language model that has learned anything beyond token frequencies must beat it."""
    import numpy as np

    from .data.loader import _split_files, read_manifest

    m = read_manifest(data_dir)
    vocab = m["vocab_size"]

    def counts(split):
        c = np.zeros(vocab, dtype=np.int64)
        for f in _split_files(data_dir, m, split):
            c += np.bincount(np.load(f, mmap_mode="r"), minlength=vocab)[:vocab]
        return c

    train, val = counts("train"), counts("val")
    logp = np.log((train + 1) / (train.sum() + vocab))
    loss = float(-(val * logp).sum() / val.sum())
    info = m["splits"]["val"]
    return {"val_loss": loss, "bpb": loss * info["tokens"] / info["bytes"] / math.log(2), "tokens": int(val.sum())}


def sample_chats(model_dir: Path, seed: int = 0) -> list[dict]:
    """Each prompt of SAMPLE_CHATS answered through `quark.load` with the card's recommended sampling."""
    from .llm import LLM

    llm = LLM.load(model_dir, device="cpu")
    out = []
    for lang, prompt in SAMPLE_CHATS:
        ids = llm.chat_ids([{"role": "user", "content": prompt}])
        budget = min(llm.defaults.max_new_tokens, llm.config.context_length - len(ids))
        stream = llm.stream_ids(ids, llm.params(max_new_tokens=budget, seed=seed))
        new = list(stream)
        ended = stream.request.finish_reason == "stop"
        out.append({"lang": lang, "user": prompt, "assistant": llm.tokenizer.decode(new),
                    "ends_with_im_end": ended, "new_tokens": len(new) + ended})
    return out


def _unavailable_lines(tok_m: dict, data_m: dict, sft_m: dict) -> list[str]:
    """The optional corpora this machine lacked, per stage; their weight went to the others in proportion."""
    out = []
    for what, m in (("tokenizer corpus", tok_m), ("pre-training mixture", data_m), ("SFT mixture", sft_m)):
        if m.get("unavailable"):
            out.append(f"- Not on this machine, left out of the {what} (its weight shared by the others): "
                       + "; ".join(f"{d['name']} (weight {d['weight']:g}, {d['reason']})" for d in m["unavailable"]))
    return ["", *out] if out else []


def _demote_headings(md: str) -> str:
    """The card's headings one level under the report's own (`#` lines inside code blocks are comments)."""
    out, fenced = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "##" + line
        out.append(line)
    return "\n".join(out)


def _j(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _summary(run: Run) -> dict:
    """Every figure of the report, read from the files the stages wrote (also `RUN/summary.json`)."""
    from .config import QuarkConfig
    from .weights import resolve_model_path

    stages = _j(run.stages_json) or {}
    pre_info, sft_info = _j(run.pretrain / "run.json"), _j(run.sft / "run.json")
    ev = {k: _j(resolve_model_path(r) / "eval_results.json") for k, r in (("base", run.pretrain), ("sft", run.sft))}
    arith = {k: (_j(f) or {}).get("tasks", {}).get("arith") for k, f in run.arith.items()}
    manifests = {"tokenizer": _j(run.tokenizer / "corpus.json") or {},  # the tokenizer's mixture (older runs: none)
                 "data": _j(run.data / "manifest.json"), "sft_data": _j(run.sft_data / "manifest.json")}
    mc = pre_info["model_config"]
    base_ppl, sft_ppl = ev["base"]["perplexity"], ev["sft"].get("perplexity") or {}
    summary = {
        "recipe": dataclasses.asdict(run.recipe), "model_config": mc,
        "n_params": QuarkConfig.from_dict(mc, source=str(run.pretrain / "run.json")).n_params(),
        "stage_seconds": {s: stages.get(s, {}).get("seconds") for s in STAGES},
        "pretrain": {k: pre_info.get(k) for k in ("steps", "tokens", "wall_time_s", "hardware", "world_size")},
        "sft": {k: sft_info.get(k) for k in ("steps", "tokens", "wall_time_s", "hardware")},
        "unigram": unigram_baseline(run.data), "base_perplexity": base_ppl, "sft_perplexity": sft_ppl,
        "sft_val_loss_increase": (sft_ppl["val_loss"] - base_ppl["val_loss"]) if sft_ppl else None,
        "eval": {"base": ev["base"]["tasks"], "sft": ev["sft"]["tasks"]},
        "arith": arith, "arith_add_or_sub_easy": {k: _group_acc(a, "add_or_sub/easy") for k, a in arith.items()},
        "chats": sample_chats(resolve_model_path(run.sft)),
        "unavailable": {k: [d["name"] for d in (m or {}).get("unavailable", [])] for k, m in manifests.items()},
    }
    summary["chats_ending_with_im_end"] = sum(c["ends_with_im_end"] for c in summary["chats"])
    summary["sft"]["pretrain_mix"] = sft_info.get("train_config", {}).get("pretrain_mix", 0.0)
    for k in ("pretrain", "sft"):
        d = summary[k]
        d["tok_per_s"] = d["tokens"] / d["wall_time_s"] if d.get("wall_time_s") else None
    return {**summary, "_manifests": manifests, "_stages": stages, "_infos": (pre_info, sft_info)}


def _group_acc(arith: dict | None, group: str) -> dict | None:
    g = (arith or {}).get("groups", {}).get(group)
    return None if g is None else {"acc": g["acc"], "n": g["n"]}


def _pct1(d: dict | None) -> str:
    return "—" if d is None or d.get("acc") is None else f"{100 * d['acc']:.1f}%"


def _result_lines(run: Run, sm: dict) -> list[str]:
    uni, base, sft = sm["unigram"], sm["base_perplexity"], sm["sft_perplexity"]
    easy = sm["arith_add_or_sub_easy"]
    out = ["## Result", "",
           f"- Validation loss of the pre-trained model: **{base['val_loss']:.4f}** nats/token "
           f"({base['bpb']:.4f} bits/byte) vs the unigram baseline of the same data **{uni['val_loss']:.4f}** "
           f"({uni['bpb']:.4f} bits/byte): {uni['val_loss'] - base['val_loss']:+.4f} nats/token better."]
    if sm["sft_val_loss_increase"] is not None:
        out.append(f"- After SFT: {sft['val_loss']:.4f} nats/token on the same pre-training validation data "
                   f"({sm['sft_val_loss_increase']:+.4f}; SFT batches were "
                   f"{100 * sm['sft']['pretrain_mix']:.0f}% pre-training windows).")
    if any(easy.values()):
        n = (easy.get("sft") or easy.get("base") or {}).get("n")
        out.append(f"- `arith` exact match on the easiest add/subtract questions (add_or_sub, easy; {n} held-out "
                   f"questions): base {_pct1(easy.get('base'))}, SFT **{_pct1(easy.get('sft'))}**.")
    chats = sm["chats"]
    out += [f"- Sample chats ending with `<|im_end|>`: {sm['chats_ending_with_im_end']}/{len(chats)}.",
            f"- Exported: `{run.hf}` (transformers, remote code)"
            + (f", `{run.gguf}` (llama.cpp)" if run.gguf.exists() else "") + ".", ""]
    return out


def _stage_lines(run: Run, sm: dict) -> list[str]:
    stages = sm["_stages"]
    out = ["## Stages", "", "| Stage | Time | Command |", "|---|---:|---|"]
    cmds = stage_commands(run, int(stages.get("recipe", {}).get("nproc", 1)))
    for s in STAGES:
        st = stages.get(s, {})
        t = _fmt_s(st.get("seconds")) + (" (earlier call)" if st.get("skipped") else "")
        c = "<br>".join(f"`{_show(x)}`" for x in cmds.get(s, []))
        out.append(f"| {s} | {t} | {c} |")
    total = sum(v for v in sm["stage_seconds"].values() if v)
    return out + [f"| **total** | **{_fmt_s(total)}** | |", ""]


def _data_lines(run: Run, sm: dict) -> list[str]:
    mc, ms = sm["model_config"], sm["_manifests"]
    data_m, sft_m = ms["data"], ms["sft_data"]
    out = ["## Model", "", f"Model preset `{run.recipe.model_preset}` (vocabulary from the tokenizer): "
           + ", ".join(f"{k} {v}" for k, v in mc.items()) + f"; **{sm['n_params']:,} parameters**.", "",
           "## Data", "",
           f"Pre-training mixture `{data_m.get('mixture')}`: {data_m['splits']['train']['tokens']:,} train and "
           f"{data_m['splits']['val']['tokens']:,} val tokens; evaluation items removed by exact-text "
           f"deduplication: {data_m.get('eval_dedup_removed', 0)}.", "",
           "| Source | Weight | Tokens | Share | Licence |", "|---|---:|---:|---:|---|"]
    tot = sum(s["tokens"] for s in data_m["sources"]) or 1
    for s in data_m["sources"]:
        out.append(f"| {s['name']} | {s['weight']:g} | {s['tokens']:,} | {100 * s['tokens'] / tot:.1f}% | "
                   f"{s.get('license', '')} |")
    out += _unavailable_lines(ms["tokenizer"], data_m, sft_m)
    return out + ["", f"SFT conversations (`{sft_m.get('mixture')}`): {sft_m['splits']['train']['rows']:,} rows of "
                  f"{sft_m.get('seq_len')} tokens, {sft_m['splits']['train']['target_tokens']:,} trained (assistant) "
                  "tokens; sources " + ", ".join(f"{s['name']} ({s['tokens']:,} tokens)" for s in sft_m["sources"])
                  + ".", ""]


def _training_lines(run: Run, sm: dict) -> list[str]:
    pre, sft = sm["pretrain"], sm["sft"]
    pre_info, sft_info = sm["_infos"]
    out = ["## Training", "", "| | Pre-training | SFT |", "|---|---:|---:|",
           f"| Steps | {pre['steps']:,} | {sft['steps']:,} |",
           f"| Tokens | {pre['tokens']:,} | {sft['tokens']:,} |",
           f"| Wall time | {_fmt_s(pre['wall_time_s'])} | {_fmt_s(sft['wall_time_s'])} |",
           f"| Throughput | {pre['tok_per_s'] or 0:,.0f} tok/s | {sft['tok_per_s'] or 0:,.0f} tok/s |",
           f"| Hardware | {pre_info.get('hardware')} | {sft_info.get('hardware')} |", ""]
    for name in ("pretrain", "sft"):
        if (run.out / name / "loss.png").exists():
            out.append(f"![{name} loss]({name}/loss.png)")
    return out + [""]


def _eval_lines(run: Run, sm: dict) -> list[str]:
    from .hf.card import pct

    ev_base, ev_sft = sm["eval"]["base"], sm["eval"]["sft"]
    out = ["## Evaluation", "",
           f"`quark eval`, zero-shot, {run.recipe.eval_limit or 'all'} items per task; accuracy in %, "
           "lm-evaluation-harness scoring.", "",
           "| Task | n | Base acc | Base acc_norm | SFT acc | SFT acc_norm | Chance |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for task, b in ev_base.items():
        s = ev_sft.get(task, {})
        out.append(f"| {task} | {b['n']} | {pct(b['acc'], b['acc_stderr'])} | {pct(b.get('acc_norm'))} | "
                   f"{pct(s.get('acc'), s.get('acc_stderr'))} | {pct(s.get('acc_norm'))} | {pct(b.get('chance'))} |")
    out += _arith_lines(sm["arith"])
    uni, bp, sp = sm["unigram"], sm["base_perplexity"], sm["sft_perplexity"]
    return out + ["", "| Validation loss (nats/token) | bits/byte |", "|---|---:|",
                  f"| unigram baseline | {uni['val_loss']:.4f} / {uni['bpb']:.4f} |",
                  f"| pre-trained | {bp['val_loss']:.4f} / {bp['bpb']:.4f} |",
                  f"| after SFT | {sp.get('val_loss', float('nan')):.4f} / {sp.get('bpb') or float('nan'):.4f} |", ""]


def _arith_lines(arith: dict) -> list[str]:
    """Exact match on held-out generated arithmetic: all, per difficulty, and add_or_sub per difficulty."""
    from .eval.arith import ARITH_MODULES

    base, sft = arith.get("base"), arith.get("sft")
    if not base and not sft:
        return []
    rows = [("all modules and difficulties", lambda g: True)]
    rows += [(f"{lv}, all {len(ARITH_MODULES)} modules", lambda g, lv=lv: g.endswith("/" + lv))
             for lv in ("easy", "medium", "hard")]
    rows += [(f"add_or_sub, {lv}", lambda g, lv=lv: g == f"add_or_sub/{lv}") for lv in ("easy", "medium", "hard")]

    def cell(res, keep):
        gs = [g for name, g in (res or {}).get("groups", {}).items() if keep(name)]
        n = sum(g["n"] for g in gs)
        return (n, "—") if not n else (n, f"{100 * sum(g['acc'] * g['n'] for g in gs) / n:.1f}")

    dedup = "; ".join(f"{k}: {r['dedup']}" for k, r in arith.items() if r and r.get("dedup"))
    out = ["", f"`arith`: held-out questions from our math generators, greedy, exact match in % (base: plain "
           f"\"Question: q\\nAnswer:\" prompts; SFT: the chat template; n base / SFT where they differ). {dedup}.",
           "",
           "| arith | n | Base | SFT |", "|---|---:|---:|---:|"]
    for label, keep in rows:
        (nb, b), (ns, f) = cell(base, keep), cell(sft, keep)
        out.append(f"| {label} | {nb if nb == ns else f'{nb} / {ns}'} | {b} | {f} |")
    return out


def _chat_lines(sm: dict) -> list[str]:
    out = ["## Sample chats", "",
           "ChatML, the card's recommended sampling (" + ", ".join(f"{k} {v}" for k, v in RECOMMENDED.items()) + ").",
           ""]
    for c in sm["chats"]:
        out += [f"**[{c['lang']}] user:** {c['user']}", "",
                f"**assistant** ({c['new_tokens']} tokens, {'ends with' if c['ends_with_im_end'] else 'no'} "
                f"`<|im_end|>`):", "", "> " + (c["assistant"].strip() or "(empty)").replace("\n", "\n> "), ""]
    return out


def _card_lines(run: Run) -> list[str]:
    from .hf.card import render_model_card
    from .weights import resolve_model_path

    card = run.hf / "README.md"
    card_text = card.read_text() if card.exists() else render_model_card(resolve_model_path(run.sft),
                                                                          name=run.recipe.name)
    body = card_text.split("\n---\n", 1)[1] if card_text.startswith("---\n") else card_text
    return ["## Use it", "", "```bash", f"quark chat --model {run.hf}",
            f"quark serve --model {run.hf}   # OpenAI API + chat page on http://127.0.0.1:8000",
            *([f"llama-cli -m {run.gguf} -cnv --chat-template chatml"] if run.gguf.exists() else []), "```", "",
            f"## Model card (the exported [`README.md`]({card.relative_to(run.out)}))", "", _demote_headings(body)]


def write_report(run: Run) -> dict:
    """RUN/report.md and RUN/summary.json from the stages' files; returns the summary."""
    from .io import atomic_write_text

    sm = _summary(run)
    lines = [f"# Speedrun report: {run.recipe.name}", "",
             f"Run folder `{run.out}`; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             "`quark speedrun`. Every figure below is read from the files the stages wrote.", "",
             *_result_lines(run, sm), *_stage_lines(run, sm), *_data_lines(run, sm), *_training_lines(run, sm),
             *_eval_lines(run, sm), *_chat_lines(sm), *_card_lines(run)]
    summary = {k: v for k, v in sm.items() if not k.startswith("_")}
    atomic_write_text(run.report, "\n".join(lines) + "\n")
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    base, uni, chats = sm["base_perplexity"], sm["unigram"], sm["chats"]
    print(f"\nvalidation loss {base['val_loss']:.4f} nats/token (pre-trained) vs unigram baseline "
          f"{uni['val_loss']:.4f}; after SFT {(sm['sft_perplexity'] or {}).get('val_loss', float('nan')):.4f}; "
          f"arith add_or_sub easy: base {_pct1(sm['arith_add_or_sub_easy'].get('base'))}, SFT "
          f"{_pct1(sm['arith_add_or_sub_easy'].get('sft'))}; sample chats ending with <|im_end|>: "
          f"{sm['chats_ending_with_im_end']}/{len(chats)}")
    for c in chats[:2] + chats[3:5]:
        print(f"  [{c['lang']}] {c['user']}\n      -> {c['assistant'].strip()[:160]!r}")
    print(f"wrote {run.report}")
    return summary
