"""`quark speedrun`: raw text to a served chat model in one command, like nanochat's speedrun but offline-first.

    quark speedrun --preset tiny --out runs/tiny          # 2 CPU cores, real offline data, < 20 minutes
    quark speedrun --preset quark-72m --out runs/q72 --nproc 8 --max-tokens 2e9   # the card's model, on GPUs

Stages, each an ordinary `quark` subcommand run as a child process (so each can also be run, inspected and
resumed alone, and pre-training can go through `torchrun` across GPUs):
    tokenizer -> data (pre-training shards) -> sft-data (ChatML rows) -> pretrain -> sft -> eval -> export -> report
  (eval: the multiple-choice tasks and the pre-training validation loss of the base and the SFT model, then `arith`,
  held-out generated arithmetic, in its own call: its `--limit` counts per module x difficulty group)
Choices:
- A stage is skipped when its output exists and is valid (the tokenizer loads; a data folder's manifest names
  that tokenizer's hash and its shards are there; a training run's run.json says it finished; ...), so an
  interrupted speedrun resumes at the first unfinished stage, and the stages resume inside (`quark prepare`
  keeps finished shards, training restarts from its newest checkpoint). When a stage does run, the outputs
  of later stages are stale: they are moved aside to `NAME.stale-N`, never deleted.
- Presets are recipes (sizes, budgets) on top of the model presets of `quark/config.py`. `--max-tokens` and
  `--max-minutes` bound pre-training of any preset; the other flags override one recipe field each.
- The report's figures are read from the files the stages wrote (manifests, run.json, metrics, eval JSON, the
  exported model card, which it embeds), never typed by hand. `RUN/summary.json` holds them for scripts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .sampling import RECOMMENDED
from .train.metrics import fmt_duration

STAGES = ("tokenizer", "data", "sft-data", "pretrain", "sft", "eval", "export", "report")


@dataclass(frozen=True)
class Recipe:
    name: str                   # model name in the card and GGUF metadata
    model_preset: str           # model shape (quark/config.py); its vocabulary is set from the trained tokenizer
    vocab_size: int             # base BPE vocabulary (the 2 chat tokens come on top)
    tokenizer_bytes: int        # corpus budget for tokenizer training
    mixture: str                # pre-training mixture (packaged name or TOML path)
    data_tokens: int            # pre-training tokens to prepare
    sft_seq_len: int            # SFT row length (the model's context)
    pretrain_config: str        # packaged train configs (quark/configs/)
    sft_config: str
    pretrain_minutes: float | None  # time bound of pre-training (None: the config's token budget)
    pretrain_tokens: int | None     # token bound of pre-training (None: the config's)
    sft_minutes: float | None
    sft_tokens: int | None = None   # token bound of SFT (None: the config's epochs)
    eval_tasks: str = "piqa,arc_easy,hellaswag"
    eval_limit: int | None = None   # items per task (None: all)
    arith_limit: int | None = None  # held-out arith questions per module x difficulty (None: 50; 0: no arith)
    sft_pretrain_mix: float = 0.0   # share of SFT rows that are pre-training windows (TrainConfig.pretrain_mix)
    gguf: bool = True


RECIPES = {
    # The README's main command: 2 CPU cores, <= 20 minutes including set-up, real offline data only (mixtures/offline.toml).
    "tiny": Recipe(name="Quark-Tiny-Instruct", model_preset="tiny", vocab_size=8192, tokenizer_bytes=24_000_000,
                   mixture="offline", data_tokens=3_000_000, sft_seq_len=256, pretrain_config="pretrain-tiny",
                   sft_config="sft-tiny",
                   pretrain_minutes=7.0, pretrain_tokens=None, sft_minutes=3.0, eval_limit=300, arith_limit=30,
                   # without pre-training rows, 3 minutes of SFT cost 0.69 nats/token of pre-training val loss
                   sft_pretrain_mix=0.25),
    # The card's model and recipe: 65,536-token BPE, the 45/45/4/4/2 mixture (Hugging Face datasets: needs
    # internet; `--mixture offline` otherwise), 5B tokens, SFT at context 2048. For GPUs, one or many (--nproc).
    "quark-72m": Recipe(name="Quark-72M-Instruct", model_preset="quark-72m", vocab_size=65536,
                        tokenizer_bytes=100_000_000, mixture="quark-72m", data_tokens=5_000_000_000, sft_seq_len=2048,
                        pretrain_config="pretrain-quark-72m", sft_config="sft-quark-72m", pretrain_minutes=None,
                        pretrain_tokens=None, sft_minutes=None),
}

SAMPLE_CHATS = [  # the report's sample conversations, English and Italian
    ("en", "Hello! How are you today?"),
    ("en", "What is 7 plus 5?"),
    ("en", "Write a Python function that returns the square of a number."),
    ("it", "Ciao! Come stai?"),
    ("it", "Qual è la capitale d'Italia?"),
    ("it", "Che cos'è un file di configurazione?"),
]


# ---- paths and validity ------------------------------------------------------------------------------------------
class Run:
    def __init__(self, out: Path, recipe: Recipe):
        self.out, self.recipe = out, recipe
        self.tokenizer = out / "tokenizer"
        self.data = out / "data"
        self.sft_data = out / "sft-data"
        self.pretrain = out / "pretrain"
        self.sft = out / "sft"
        self.export = out / "export"
        self.hf = self.export / recipe.name
        self.gguf = self.export / f"{recipe.name}.gguf"
        self.model_json = out / "model.json"
        self.report = out / "report.md"
        self.stages_json = out / "stages.json"
        self.arith = {"base": out / "eval" / "arith-base.json", "sft": out / "eval" / "arith-sft.json"}

    def outputs(self, stage: str) -> list[Path]:
        return {"tokenizer": [self.tokenizer], "data": [self.data], "sft-data": [self.sft_data],
                "pretrain": [self.pretrain], "sft": [self.sft], "eval": self._eval_files(),
                "export": [self.export], "report": [self.report]}[stage]

    def _eval_files(self) -> list[Path]:
        from .weights import resolve_model_path

        files = []
        for run in (self.pretrain, self.sft):
            try:
                files.append(resolve_model_path(run) / "eval_results.json")
            except FileNotFoundError:
                pass
        return files + (list(self.arith.values()) if self.recipe.arith_limit != 0 else [])

    def valid(self, stage: str) -> bool:
        try:
            return bool(getattr(self, "_valid_" + stage.replace("-", "_"))())
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return False

    def _tokenizer_sha(self) -> str:
        from .tokenizer import Tokenizer

        return Tokenizer.load(self.tokenizer).sha256()

    def _valid_tokenizer(self):
        return (self.tokenizer / "tokenizer_config.json").exists() and self._tokenizer_sha()

    def _valid_data_folder(self, folder: Path) -> bool:
        m = json.loads((folder / "manifest.json").read_text())
        if m.get("tokenizer_sha256") != self._tokenizer_sha():
            return False
        return all((folder / split / f).exists() for split, info in m["splits"].items()
                   for key in ("shards", "mask_shards") for f in info.get(key, []))

    def _valid_data(self):
        return self._valid_data_folder(self.data)

    def _valid_sft_data(self):
        return self._valid_data_folder(self.sft_data)

    def _finished(self, run: Path) -> bool:
        from .weights import resolve_model_path

        info = json.loads((run / "run.json").read_text())
        return bool(info.get("finished")) and (resolve_model_path(run) / "config.json").exists()

    def _valid_pretrain(self):
        return self._finished(self.pretrain)

    def _valid_sft(self):
        return self._finished(self.sft)

    def _valid_eval(self):
        files = self._eval_files()
        from .eval.cli import parse_tasks

        want = set(parse_tasks(self.recipe.eval_tasks))
        results = [json.loads(f.read_text()) for f in files]
        main = [r for f, r in zip(files, results) if f.name == "eval_results.json"]
        arith = [r for f, r in zip(files, results) if f in self.arith.values()]
        return (len(main) == 2 and all(set(r.get("tasks", {})) >= want and r.get("perplexity") for r in main)
                and (self.recipe.arith_limit == 0 or (len(arith) == 2 and all("arith" in r["tasks"] for r in arith))))

    def _valid_export(self):
        return ((self.hf / "model.safetensors").exists() and (self.hf / "README.md").exists()
                and (not self.recipe.gguf or self.gguf.exists()))

    def _valid_report(self):
        return False  # cheap, and it reads every other stage: always rewritten


# ---- the stages ------------------------------------------------------------------------------------------------
def _quark(*args, nproc: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "quark", *map(str, args)]


def stage_commands(run: Run, nproc: int = 1) -> dict[str, list[list[str]]]:
    r, q = run.recipe, _quark
    bound = ["--set", f"model={json.dumps(str(run.model_json))}"]
    if r.pretrain_minutes is not None:
        bound += ["--set", f"max_minutes={r.pretrain_minutes:g}"]
    if r.pretrain_tokens is not None:
        bound += ["--set", f"max_tokens={r.pretrain_tokens}"]
    sft_bound = ["--set", f"max_minutes={r.sft_minutes:g}"] if r.sft_minutes is not None else []
    if r.sft_tokens is not None:  # a token bound replaces the config's one epoch (a small SFT set is repeated)
        sft_bound += ["--set", f"max_tokens={r.sft_tokens}", "--set", "epochs=0"]
    if r.sft_pretrain_mix:
        sft_bound += ["--set", f"pretrain_mix={r.sft_pretrain_mix:g}"]
    tasks = ["--tasks", r.eval_tasks] + (["--limit", str(r.eval_limit)] if r.eval_limit else [])
    arith = ["--tasks", "arith", "--no-progress"] + (["--limit", str(r.arith_limit)] if r.arith_limit else [])
    cmds = {
        "tokenizer": [q("tokenizer", "train", "--vocab-size", r.vocab_size, "--max-bytes", r.tokenizer_bytes,
                        "--out", run.tokenizer)],
        "data": [q("prepare", "--mixture", r.mixture, "--tokenizer", run.tokenizer, "--out", run.data,
                   "--tokens", r.data_tokens)],
        "sft-data": [q("prepare", "--mixture", "sft", "--tokenizer", run.tokenizer, "--out", run.sft_data,
                       "--seq-len", r.sft_seq_len)],
        "pretrain": [q("pretrain", "--config", r.pretrain_config, "--data", run.data, "--tokenizer", run.tokenizer,
                       "--out", run.pretrain, *bound, nproc=nproc)],
        "sft": [q("sft", "--config", r.sft_config, "--data", run.sft_data, "--from", run.pretrain, "--out", run.sft,
                  "--pretrain-data", run.data, *sft_bound, nproc=nproc)],
        "eval": [q("eval", "--model", m, *tasks, "--perplexity", run.data) for m in (run.pretrain, run.sft)],
        "export": [q("export", "--checkpoint", run.sft, "--out", run.hf, "--name", r.name, "--force")],
    }
    if r.arith_limit != 0:  # its own call: its --limit counts per module x difficulty group
        cmds["eval"] += [q("eval", "--model", m, *arith, "--output", run.arith[k])
                         for k, m in (("base", run.pretrain), ("sft", run.sft))]
    if r.gguf:
        cmds["export"].append(q("export", "--checkpoint", run.sft, "--out", run.gguf, "--format", "gguf",
                                "--name", r.name, "--force"))
    return cmds


def write_model_config(run: Run) -> None:
    """RUN/model.json: the recipe's model preset with the embedding rows of the tokenizer actually trained."""
    from .config import QuarkConfig
    from .io import atomic_write_text
    from .tokenizer import Tokenizer

    cfg = QuarkConfig.from_name(run.recipe.model_preset).replace(vocab_size=Tokenizer.load(run.tokenizer).vocab_size)
    atomic_write_text(run.model_json, json.dumps(cfg.to_dict(), indent=2) + "\n")


def _move_aside(path: Path) -> None:
    if not path.exists():
        return
    n = 1
    while path.with_name(f"{path.name}.stale-{n}").exists():
        n += 1
    dest = path.with_name(f"{path.name}.stale-{n}")
    path.rename(dest)
    print(f"speedrun: {path} was built from an earlier stage's older output; moved aside to {dest}", flush=True)


def _record(run: Run, stage: str, **info) -> None:
    from .io import atomic_write_text

    d = json.loads(run.stages_json.read_text()) if run.stages_json.exists() else {}
    d[stage] = {**d.get(stage, {}), **info}
    atomic_write_text(run.stages_json, json.dumps(d, indent=2) + "\n")


def speedrun(out: str | Path, recipe: Recipe, nproc: int = 1) -> dict:
    """Run (or resume) every stage into `out`; returns the report's summary dict."""
    run = Run(Path(out), recipe)
    from .data.mixture import load_mixture

    for mixture in ("tokenizer", recipe.mixture, "sft"):  # a language left with no source fails here, before work
        load_mixture(mixture)
    if not run.valid("eval"):  # fail in seconds, not after the training stages, when the eval data is missing
        from .eval.cli import parse_tasks
        from .eval.tasks import build_items

        for task in parse_tasks(recipe.eval_tasks):
            build_items(task, 1)
    run.out.mkdir(parents=True, exist_ok=True)
    _record(run, "recipe", **dataclasses.asdict(recipe), nproc=nproc)
    cmds = stage_commands(run, nproc)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PYTHONUNBUFFERED": "1"}
    ran = False
    for i, stage in enumerate(STAGES, 1):
        head = f"[speedrun {i}/{len(STAGES)}] {stage}"
        if not ran and run.valid(stage):
            print(f"{head}: done already, skipped", flush=True)
            _record(run, stage, skipped=True)
            continue
        if ran:  # an earlier stage ran: whatever this stage left behind was built from older inputs
            for p in run.outputs(stage):
                _move_aside(p)
        ran = True
        t0 = time.time()
        if stage == "pretrain":
            write_model_config(run)
        if stage == "report":
            print(head, flush=True)
            summary = write_report(run)
        else:
            for cmd in cmds[stage]:
                print(f"{head}: {_show(cmd)}", flush=True)
                rc = subprocess.run(cmd, env=env).returncode
                if rc != 0:
                    raise RuntimeError(f"stage {stage!r} failed (exit code {rc}); fix the cause and run the same "
                                       "command again: finished stages are skipped")
            if not run.valid(stage):
                raise RuntimeError(f"stage {stage!r} finished but its output {run.outputs(stage)} is not valid")
        _record(run, stage, seconds=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()), skipped=False)
    return summary


# ---- the report ------------------------------------------------------------------------------------------------
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


def _show(cmd: list[str]) -> str:
    """A stage's command as a user would type it (`quark ...` rather than `/path/python -m quark ...`)."""
    text = shlex.join(cmd)
    return text.replace(f"{shlex.quote(sys.executable)} -m torch.distributed.run", "torchrun").replace(
        f"{shlex.quote(sys.executable)} -m quark", "quark")


def _j(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt_s(s) -> str:
    return "—" if s is None else fmt_duration(s)


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


# ---- CLI -------------------------------------------------------------------------------------------------------
def _recipe_from_args(args) -> Recipe:
    r = RECIPES[args.preset]
    kw = {}
    if args.max_tokens is not None:
        kw["pretrain_tokens"] = int(args.max_tokens)
        # no more data than it can train on, but enough for a validation split worth the name
        kw["data_tokens"] = min(r.data_tokens, max(int(args.max_tokens), 2_000_000))
    if args.max_minutes is not None:
        kw["pretrain_minutes"] = args.max_minutes
    for f in ("vocab_size", "tokenizer_bytes", "mixture", "data_tokens", "sft_minutes", "sft_tokens", "eval_limit",
              "eval_tasks", "name", "arith_limit", "sft_pretrain_mix"):
        v = getattr(args, f, None)
        if v is not None:
            kw[f] = v
    if args.no_gguf:
        kw["gguf"] = False
    for k in ("pretrain_tokens", "data_tokens", "vocab_size", "tokenizer_bytes", "eval_limit", "sft_tokens"):
        if k in kw and kw[k] is not None and kw[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')}: must be a positive number, got {kw[k]}")
    if kw.get("arith_limit") is not None and kw["arith_limit"] < 0:
        raise ValueError(f"--arith-limit: must be >= 0 (0: no arith), got {kw['arith_limit']}")
    if kw.get("sft_pretrain_mix") is not None and not 0 <= kw["sft_pretrain_mix"] < 1:
        raise ValueError(f"--sft-pretrain-mix: must be in [0, 1), got {kw['sft_pretrain_mix']}")
    for k in ("pretrain_minutes", "sft_minutes"):
        if k in kw and kw[k] is not None and kw[k] <= 0:
            raise ValueError(f"{k}: must be a positive number of minutes, got {kw[k]}")
    return dataclasses.replace(r, **kw)


def cmd_speedrun(args) -> None:
    recipe = _recipe_from_args(args)
    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    run = Run(Path(args.out), recipe)
    if args.print_commands:
        for stage, cmds in stage_commands(run, args.nproc).items():
            for c in cmds:
                print(f"# {stage}\n{_show(c)}")
        return
    t0 = time.time()
    speedrun(args.out, recipe, nproc=args.nproc)
    print(f"\nspeedrun finished in {_fmt_s(time.time() - t0)} (this call). Next:\n"
          f"  quark chat --model {run.hf}\n"
          f"  quark serve --model {run.hf}      # then open http://127.0.0.1:8000\n"
          f"  less {run.report}")


def _float_int(s: str) -> int:
    return int(float(s))  # accepts 2e9


def add_commands(sub) -> None:
    p = sub.add_parser("speedrun", help="raw text to a served chat model: tokenizer, data, pretrain, SFT, eval, "
                       "export, report")
    p.add_argument("--preset", choices=sorted(RECIPES), default="tiny",
                   help="recipe: tiny (2 CPU cores, < 20 min, offline data) or quark-72m (the card's, GPUs)")
    p.add_argument("--out", required=True, help="run folder; rerunning resumes it, skipping finished stages")
    p.add_argument("--max-tokens", type=_float_int, help="bound pre-training (and prepared data) to N tokens")
    p.add_argument("--max-minutes", type=float, help="bound pre-training to N minutes")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for training, through torchrun")
    p.add_argument("--mixture", help="pre-training mixture: packaged name (offline, quark-72m) or a TOML path")
    p.add_argument("--vocab-size", type=int, help="override the recipe's base vocabulary")
    p.add_argument("--tokenizer-bytes", type=_float_int, help="override the tokenizer corpus budget")
    p.add_argument("--data-tokens", type=_float_int, help="override the pre-training tokens to prepare")
    p.add_argument("--sft-minutes", type=float, help="override the SFT time bound")
    p.add_argument("--sft-tokens", type=_float_int, help="bound SFT to N tokens")
    p.add_argument("--eval-limit", type=int, help="items per evaluation task")
    p.add_argument("--eval-tasks", help="comma-separated tasks (default piqa,arc_easy,hellaswag)")
    p.add_argument("--arith-limit", type=int, help="held-out arith questions per module x difficulty (0: skip arith)")
    p.add_argument("--sft-pretrain-mix", type=float, help="share of SFT rows that are pre-training windows")
    p.add_argument("--name", help="model name in the card and the export folder")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF export")
    p.add_argument("--print-commands", action="store_true", help="print each stage's command and exit")
    p.set_defaults(func=cmd_speedrun)
