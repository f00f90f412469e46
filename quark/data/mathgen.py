"""Math text from DeepMind's `mathematics-dataset` (Apache-2.0): school-level question/answer pairs, generated.

The package (2019) predates sympy 1.12 and numpy 2, so it fails to import or to run some modules. We fix that by
wrapping, never by editing site-packages:
- `sympy.solvers.diophantine.base_solution_linear` moved to `sympy.solvers.diophantine.diophantine`: re-exported.
- numpy 2 removed `np.object` and `ndarray.itemset`: `mathematics_dataset.sample.polynomials` gets a numpy proxy
  whose `object` is `object` and whose `zeros`/`empty` return an ndarray subclass with `itemset`.
- Upstream draws from Python sets (`random.choice(list(a_set))` of letters, a set of entity objects hashed by
  address), so its output changes from run to run even with a fixed seed. `Context.pop` is wrapped to choose from
  the sorted letters and `expand_entities` to de-duplicate in first-seen order; string-hash order elsewhere is
  pinned by generating in worker processes started with PYTHONHASHSEED=0 (see `quark.data.prepare`).
Generation is then deterministic per (seed, chunk): `random`, `numpy.random` and sympy's RNG are seeded before
each chunk, so a chunk's text does not depend on which process generated it or on what ran before.
"""

from __future__ import annotations

import importlib
import itertools
import random
import types
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from multiprocessing.pool import Pool

import numpy as np

LICENSE = "Apache-2.0 (DeepMind mathematics_dataset, generated)"
_MODULES: dict | None = None
# Sampling weights of the slowest modules (10-90 ms a problem against ~2 ms for the rest), so generation keeps up
# with tokenization; every module still appears.
SLOW_MODULE_WEIGHTS = {"probability__swr_p_level_set": 0.1, "probability__swr_p_sequence": 0.3,
                       "calculus__differentiate": 0.5, "arithmetic__simplify_surd": 0.5, "polynomials__expand": 0.5}


class _ItemsetArray(np.ndarray):
    def itemset(self, index: int | tuple, value: object) -> None:  # numpy < 2 API used by mathematics_dataset
        self[index] = value


def _numpy_proxy() -> types.ModuleType:
    proxy = types.ModuleType("numpy_compat")
    proxy.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__") and k != "object"})
    proxy.object = object
    proxy.zeros = lambda *a, **k: np.zeros(*a, **k).view(_ItemsetArray)
    proxy.empty = lambda *a, **k: np.empty(*a, **k).view(_ItemsetArray)
    return proxy


def math_modules() -> dict:
    """{name: generator function} for every mathematics_dataset training module, sorted by name."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    dioph = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dioph, "base_solution_linear"):
        from sympy.solvers.diophantine.diophantine import base_solution_linear
        dioph.base_solution_linear = base_solution_linear
    try:
        polys = importlib.import_module("mathematics_dataset.sample.polynomials")
        from mathematics_dataset.modules import modules
    except ImportError as e:
        raise RuntimeError(f"math source needs `pip install --no-deps mathematics-dataset` and sympy ({e})") from None
    polys.np = _numpy_proxy()
    _make_deterministic(importlib.import_module("mathematics_dataset.util.composition"))
    flat: dict = {}

    def add(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                add(v, f"{prefix}{k}__")
            else:
                flat[prefix + k] = v

    add(modules.train(lambda r: r))  # the full training entropy range
    _MODULES = dict(sorted(flat.items()))
    return _MODULES


DIFFICULTIES = ("easy", "medium", "hard")


@lru_cache(maxsize=len(DIFFICULTIES))
def leveled_modules(difficulty: str) -> dict:
    """{name: generator} like `math_modules`, restricted to one third of the training entropy range, as upstream's
    train-easy / train-medium / train-hard splits (`mathematics_dataset.generate._make_entropy_fn(level, 3)`)."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}; allowed: {', '.join(DIFFICULTIES)}")
    math_modules()  # applies the compatibility patches
    from mathematics_dataset.generate import _make_entropy_fn
    from mathematics_dataset.modules import modules

    level = DIFFICULTIES.index(difficulty)
    return {f"{group}__{name}": fn for group, d in sorted(modules.train(_make_entropy_fn(level, 3)).items())
            for name, fn in sorted(d.items())}


def generate_problems(module: str, difficulty: str, seed: int, n: int) -> list[tuple[str, str]]:
    """`n` distinct (question, answer) pairs of one module at one difficulty, a pure function of the arguments
    (run it with PYTHONHASHSEED=0, as `math_pool` workers are, for run-to-run identical text)."""
    mods = leveled_modules(difficulty)
    if module not in mods:
        raise ValueError(f"unknown math module {module!r}")
    _seed_all(seed * 1_000_003 + DIFFICULTIES.index(difficulty) * 1009 + sorted(mods).index(module))
    out: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(50 * n):
            if len(out) >= n:
                break
            try:
                p = mods[module]()
            except Exception:  # noqa: BLE001, S112 - corner cases of current sympy: resample
                continue
            q, a = str(p.question).strip(), str(p.answer).strip()
            if q and a and len(q) <= 160 and len(a) <= 30:
                out.setdefault(q, a)
    return list(out.items())


def leveled_problems(seed: int, modules: Sequence[str], difficulty: str, start: int = 0, per_chunk: int = 16,
                     pool: Pool | None = None) -> Iterator[tuple[str, str]]:
    """Endless (question, answer) pairs of the named modules at one difficulty: chunk c is `per_chunk` problems per
    module from `generate_problems(module, difficulty, seed * 100_003 + c, per_chunk)`, interleaved; pair k is the
    same on every call (chunks are generated in `pool` when given). For training sets that target a skill (the SFT
    mixture's arithmetic); the `arith` eval draws its own far-away seed and deduplicates against the training
    shards."""
    if not modules:
        raise ValueError("leveled_problems: no modules named")
    from functools import partial

    chunk, skip = divmod(start, per_chunk * len(modules))
    make = partial(_leveled_chunk, seed, tuple(modules), difficulty, per_chunk)
    while True:
        window = range(chunk, chunk + 16)
        for pairs in (pool.imap(make, window) if pool is not None else map(make, window)):
            yield from pairs[skip:]
            skip = 0
        chunk += len(window)


def _leveled_chunk(seed: int, modules: tuple[str, ...], difficulty: str, per_chunk: int,
                   chunk: int) -> list[tuple[str, str]]:
    per_module = [generate_problems(m, difficulty, seed * 100_003 + chunk, per_chunk) for m in modules]
    return [p for group in itertools.zip_longest(*per_module) for p in group if p is not None]


def _make_deterministic(comp: types.ModuleType) -> None:
    if getattr(comp, "_quark_patched", False):
        return
    upstream_expand = comp.expand_entities

    def pop(self: object) -> object:
        allowed = sorted(comp._ALLOWED_SYMBOLS - self._relation_symbols - self._self_symbols - self._child_symbols)
        if not allowed:
            raise ValueError("Ran out of symbols")
        symbol = random.choice(allowed)
        self._self_symbols.add(symbol)
        return symbol

    class _OrderedSet(list):  # what upstream's `set(...)` becomes: same members, first-seen order
        def add(self, x: object) -> None:
            if x not in self:
                self.append(x)

    def expand_entities(context: object, **kwargs: object) -> object:
        builtins_set = comp.__dict__.get("set")
        comp.set = lambda items=(): _OrderedSet(dict.fromkeys(items))
        try:
            return upstream_expand(context, **kwargs)
        finally:
            if builtins_set is None:
                del comp.set
            else:
                comp.set = builtins_set

    comp.Context.pop = pop
    comp.expand_entities = expand_entities
    comp._quark_patched = True


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        from sympy.core import random as sympy_random
        sympy_random.seed(seed)
    except (ImportError, AttributeError):
        pass


def generate_chunk(seed: int, chunk: int, n_problems: int = 64) -> list[tuple[str, str, str]]:
    """`n_problems` (module, question, answer) triples, a pure function of (seed, chunk)."""
    mods = math_modules()
    names = list(mods)
    weights = [SLOW_MODULE_WEIGHTS.get(n, 1.0) for n in names]
    _seed_all(seed * 1_000_003 + chunk)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(out) < n_problems:
            name = random.choices(names, weights)[0]
            try:
                p = mods[name]()
            except Exception:  # noqa: BLE001, S112 - a few modules hit corner cases of current sympy: resample
                continue
            q, a = str(p.question).strip(), str(p.answer).strip()
            if q and a and len(q) <= 160 and len(a) <= 30:  # the package's own MAX_QUESTION/ANSWER_LENGTH
                out.append((name, q, a))
    return out


def math_document(seed: int, chunk: int, problems_per_doc: int = 16) -> str:
    """Document `chunk`: `problems_per_doc` 'Question: ...' / 'Answer: ...' pairs, a pure function of its args."""
    return pairs_document([(q, a) for _, q, a in generate_chunk(seed, chunk, problems_per_doc)])


def pairs_document(pairs: Sequence[tuple[str, str]]) -> str:
    """The pre-training text of (question, answer) pairs: 'Question: q\\nAnswer: a' blocks, blank-line separated
    (the form `quark eval`'s arith and gsm8k prompts ask in)."""
    return "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs) + "\n"


def _init_worker() -> None:
    math_modules()


def math_pool(workers: int) -> Pool:
    """A process pool for generation, spawned with PYTHONHASHSEED=0 so no set order can leak into the text."""
    import multiprocessing as mp
    import os

    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        return mp.get_context("spawn").Pool(workers, initializer=_init_worker)
    finally:
        if old is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = old


def _doc_for_chunk(seed: int, problems_per_doc: int, chunk: int) -> str:
    return math_document(seed, chunk, problems_per_doc)


def math_documents(seed: int = 0, start_chunk: int = 0, problems_per_doc: int = 16,
                   pool: Pool | None = None) -> Iterator[str]:
    """Endless documents: document k is `math_document(seed, k)`, generated in `pool` when given."""
    from functools import partial

    make = partial(_doc_for_chunk, seed, problems_per_doc)
    chunk = start_chunk
    while True:
        if pool is None:
            yield make(chunk)
            chunk += 1
            continue
        window = range(chunk, chunk + 64)  # bounded: Pool.imap would drain an endless iterator at once
        yield from pool.imap(make, window, chunksize=2)
        chunk += len(window)
