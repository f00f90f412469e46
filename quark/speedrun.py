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
- The report (`quark/speedrun_report.py`) reads its figures from the files the stages wrote (manifests, run.json,
  metrics, eval JSON, the exported model card, which it embeds), never typed by hand; `RUN/summary.json` holds
  them for scripts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
                   # without pre-training rows, 250 SFT steps cost 0.69 nats/token of pre-training val loss (dev/LOG.md)
                   sft_pretrain_mix=0.25),
    # The card's model and recipe: 65,536-token BPE, the 45/45/4/4/2 mixture (Hugging Face datasets: needs
    # internet; `--mixture offline` otherwise), 5B tokens, SFT at context 2048. For GPUs, one or many (--nproc).
    "quark-72m": Recipe(name="Quark-72M-Instruct", model_preset="quark-72m", vocab_size=65536,
                        tokenizer_bytes=100_000_000, mixture="quark-72m", data_tokens=5_000_000_000, sft_seq_len=2048,
                        pretrain_config="pretrain-quark-72m", sft_config="sft-quark-72m", pretrain_minutes=None,
                        pretrain_tokens=None, sft_minutes=None),
}


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


def speedrun(out: str | Path, recipe: Recipe, nproc: int = 1, *, write_report: Callable[[Run], dict]) -> dict:
    """Run (or resume) every stage into `out`; returns the report's summary dict (quark/speedrun_report.py's
    `write_report` writes it; quark/speedrun_cli.py passes it in)."""
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

def _show(cmd: list[str]) -> str:
    """A stage's command as a user would type it (`quark ...` rather than `/path/python -m quark ...`)."""
    text = shlex.join(cmd)
    return text.replace(f"{shlex.quote(sys.executable)} -m torch.distributed.run", "torchrun").replace(
        f"{shlex.quote(sys.executable)} -m quark", "quark")


def _fmt_s(s: float | None) -> str:
    return "—" if s is None else fmt_duration(s)
