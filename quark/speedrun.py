"""`quark speedrun`: raw text to a served chat model in one command, like nanochat's speedrun but offline-first.

Stages, each a `quark` subcommand run as a child process (so each can also be run, inspected and resumed
alone, and so pre-training can go through `torchrun` on several GPUs):
    tokenizer -> data (pre-training shards, SFT rows) -> pretrain -> sft -> eval -> export (HF + GGUF) -> report
Choices:
- A stage is skipped when `RUN/stages.json` records it as finished and its output still exists; an interrupted
  speedrun therefore resumes at the first unfinished stage, and the stages themselves resume inside
  (`quark prepare` keeps finished shards, training restarts from its newest checkpoint).
- Presets are recipes (sizes, budgets) on top of the model presets of `quark/config.py`; `--max-tokens` and
  `--max-minutes` bound pre-training for any preset.
- The report's figures are read from the files the stages wrote (manifests, metrics, eval JSON, the model
  card), never typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    model_preset: str
    vocab_size: int
    tokenizer_bytes: int
    pretrain_tokens: int
    pretrain_minutes: float
    sft_minutes: float
    eval_limit: int | None
    pretrain_config: str
    sft_config: str
    sft_examples: int | None = None
    extra_pretrain: tuple[str, ...] = field(default=())


RECIPES = {
    # 2 CPU cores, <= 20 minutes including set-up, real offline data only.
    "tiny": Recipe(model_preset="tiny", vocab_size=8192, tokenizer_bytes=24_000_000, pretrain_tokens=6_000_000,
                   pretrain_minutes=7.0, sft_minutes=2.0, eval_limit=300, pretrain_config="pretrain-tiny",
                   sft_config="sft-tiny"),
    # The card's model and recipe: 5B tokens on GPUs (bound it with --max-tokens / --max-minutes).
    "quark-72m": Recipe(model_preset="quark-72m", vocab_size=65536, tokenizer_bytes=400_000_000,
                        pretrain_tokens=5_000_000_000, pretrain_minutes=0, sft_minutes=0, eval_limit=None,
                        pretrain_config="pretrain-quark-72m", sft_config="sft-quark-72m"),
}
