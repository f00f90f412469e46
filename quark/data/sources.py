"""Data sources: what a mixture entry names, and how its documents are read.

A source is a dict from a mixture file (`name`, `type`, `weight`, type-specific keys) turned into a `Source` whose
`documents(seed, epoch)` yields text documents (`str`) or conversations (lists of OpenAI-format messages).
Types:
- `files`: `paths` = files, folders (searched recursively) or globs. txt/md/rst/html and code files are one
  document each; `.jsonl` is one document per line (field `field`, default "text"; conversations: "messages");
  `.parquet` one per row of column `field`. A JSONL line over 8 MiB (2 MiB for a conversation) is a bad record,
  measured as it is read and never parsed, so memory stays bounded; so is a line nested too deeply for `json`, and
  text holding an unpaired surrogate (a lone JSON `\\ud800` escape, which no tokenizer takes). Bad records name
  file:line (and the field), and `--skip-bad` skips and counts them.
- `hf`: a Hugging Face dataset streamed with `datasets.load_dataset(dataset, config, split=..., streaming=True)`;
  `dataset` may also be a local folder of parquet/jsonl files (how the tests exercise this path offline). The text
  of a row is `field` when given, else `text`/`content`, else a `conversations`/`messages` list, else the row's
  string columns joined.
- the offline corpora (`quark.data.offline`, installed Debian packages and Python files): `python_stdlib`, `site_packages`, `math`, `handbook`,
  `fortunes`, `bible`, `chatterbot`, `instructions` (`kind` = docstring | math | handbook), with `lang` en/it.
Generated math (`math`, `instructions` of kind math) covers every mathematics_dataset module over the whole
training range, unless `modules` (e.g. ["arithmetic__add_or_sub"]) and `difficulty` (easy | medium | hard, upstream's
thirds of that range) narrow it to a skill (`quark.data.mathgen.leveled_problems`, seeds offset by 7919).
`max_documents` caps any source (a capped generator becomes finite and is repeated like a file corpus).
Every source records a licence: the built-in ones know theirs, `files`/`hf` sources must state one (`license`).
A conversation used in a pre-training mixture is flattened to "User: ...\\nAssistant: ..." text.
"""

from __future__ import annotations

import glob as globlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from typing import BinaryIO

from ..textio import utf8_line, utf8_problem
from . import offline

TEXT_EXTS = {".txt", ".md", ".rst", ".tex", ".html", ".htm", ".csv", ".tsv", ".json", ".yaml", ".yml", ".toml"}
CODE_EXTS = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".jsx", ".tsx",
             ".sh", ".bash", ".rb", ".php", ".swift", ".kt", ".scala", ".lua", ".pl", ".r", ".jl", ".sql", ".hs",
             ".cs", ".m", ".f90", ".css", ".ipynb", ".cfg", ".ini", ".mk", ".cmake"}
BUILTIN = {"python_stdlib", "site_packages", "math", "handbook", "fortunes", "bible", "chatterbot", "instructions"}
TYPES = BUILTIN | {"files", "hf"}
CHAT_TYPES = {"chatterbot", "instructions"}
# The longest JSONL line read (longer ones are refused unread): tokenizing takes ~170 bytes of RAM per byte of text
# (`encode_batch_fast`) and ~300 per byte of a conversation (`render_chat`); a 60 MB line once took 9 GB.
MAX_TEXT_RECORD_BYTES, MAX_CHAT_RECORD_BYTES = 8 << 20, 2 << 20
HF_LICENSES = {  # the card's datasets, for users with internet
    "open-web-math/open-web-math": "ODC-By-1.0",
    "bigcode/the-stack-smol": "The Stack terms of use (permissively licensed source files)",
    "Magpie-Align/Magpie-Reasoning-150K": "Llama 3 Community License (Magpie-Align)",
    "open-thoughts/OpenThoughts-114k": "Apache-2.0",
    "KingNish/reasoning-base-20k": "Apache-2.0",
}


class BadRecord(ValueError):
    """A malformed input record; `where` is 'file:line' (or the source and row)."""

    def __init__(self, where: str, msg: str):
        super().__init__(f"{where}: {msg}")
        self.where = where


class Conversation(list):
    """A list of messages that remembers where it was read ('file:line'), for error messages."""

    where: str | None = None


@dataclass
class Source:
    name: str
    type: str
    weight: float
    license: str
    options: dict = field(default_factory=dict)
    _capped: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_chat(self) -> bool:
        return self.type in CHAT_TYPES or bool(self.options.get("chat"))

    @property
    def is_generated(self) -> bool:
        return self.type == "math" or (self.type == "instructions" and self.options.get("kind") == "math")

    @property
    def is_endless(self) -> bool:
        return self.is_generated and not self.options.get("max_documents")

    @property
    def language(self) -> str | None:
        """What the source teaches, for the 'nothing left for X' check: code, math, or its natural language."""
        if self.type in ("python_stdlib", "site_packages"):
            return "code"
        if self.is_generated:
            return "math"
        if self.type in BUILTIN:
            return self.options.get("lang", "en")
        return self.options.get("lang")

    def unavailable(self) -> str | None:
        """Why this source cannot be read on this machine ('not installed (...)'), or None. Only the optional
        built-in corpora can be missing; a user's own files are checked (and fail) when the mixture is loaded."""
        if self.type not in BUILTIN:
            return None
        kind = "math" if self.is_generated else self.options.get("kind", "docstring") \
            if self.type == "instructions" else self.type
        return offline.unavailable(kind, self.options.get("lang", "en"))

    def documents(self, seed: int = 0, epoch: int = 0, start: int = 0, pool: Pool | None = None) -> Iterator:
        """Documents in a fixed order from the `start`-th on. A malformed record is yielded as a `BadRecord` (the
        caller skips or stops). `pool` parallelises math generation."""
        cap = self.options.get("max_documents")
        if self.is_generated:
            if cap is None:  # endless: each epoch is new problems
                return self._generated(seed + 1_000 * epoch, start, pool)
            if seed not in self._capped:  # capped: generated once, repeated from memory (generation is slow)
                self._capped[seed] = list(itertools.islice(self._generated(seed, 0, pool), cap))
            return iter(self._capped[seed][start:])
        return itertools.islice(self._documents(seed), start, cap)

    def _generated(self, seed: int, start: int, pool: Pool | None) -> Iterator:
        from .mathgen import leveled_problems, math_documents, pairs_document
        from .offline import math_instructions

        o = self.options
        ppd = int(o.get("problems_per_doc", 16))
        if "modules" not in o:  # every module over the whole training range
            if self.type == "math":
                return math_documents(seed, start, ppd, pool=pool)
            return math_instructions(seed, start)
        pairs = leveled_problems(seed + 7919, o["modules"], o.get("difficulty", "easy"), pool=pool)
        if self.type == "instructions":
            return ([{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                    for q, a in itertools.islice(pairs, start, None))
        docs = (pairs_document(list(itertools.islice(pairs, ppd))) for _ in itertools.count())
        return itertools.islice(docs, start, None)

    def _documents(self, seed: int) -> Iterator:
        o, t = self.options, self.type
        lang = o.get("lang", "en")
        rng = random.Random(f"{seed}-{self.name}")  # so a budget smaller than the source samples all of it
        if t in ("python_stdlib", "site_packages"):
            files = offline.stdlib_files() if t == "python_stdlib" else offline.site_packages_files()
            rng.shuffle(files)
            return map(offline.code_text, files)
        if t == "files":
            return file_documents(o["paths"], o.get("field"), chat=self.is_chat, rng=rng)
        if t == "hf":  # streamed in the dataset's order (it may be terabytes)
            return hf_documents(o["dataset"], o.get("config"), o.get("split", "train"), o.get("field"),
                                chat=self.is_chat, data_files=o.get("data_files"))
        if t == "instructions" and o.get("kind", "docstring") == "docstring":
            return offline.docstring_instructions(lang)
        small = {  # a few MB each: read whole and shuffled
            "handbook": lambda: offline.handbook_documents(lang),
            "fortunes": lambda: offline.fortune_documents(lang),
            "bible": offline.bible_documents,
            "chatterbot": lambda: offline.chatterbot_conversations(lang),
            "instructions": lambda: offline.handbook_instructions(lang),
        }
        docs = list(small[t]())
        rng.shuffle(docs)
        return iter(docs)


def make_source(spec: dict, where: str = "mixture") -> Source:
    """Validate one mixture entry (no data is read) and build its `Source`."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: each source must be a table with name, type, weight")  # noqa: TRY004 - the CLI reports ValueError
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a source is missing its 'name'")
    where = f"{where}: source {name!r}"
    typ = spec.get("type")
    if typ not in TYPES:
        raise ValueError(f"{where}: unknown type {typ!r}; allowed: {', '.join(sorted(TYPES))}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"{where}: weight must be a number >= 0, got {weight!r}")
    opts = {k: v for k, v in spec.items() if k not in {"name", "type", "weight", "license"}}
    if opts.get("lang", "en") not in ("en", "it"):
        raise ValueError(f"{where}: lang must be 'en' or 'it', got {opts['lang']!r}")
    if typ == "files":
        paths = opts.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: 'paths' must list files, folders or globs")
        opts["paths"] = paths
        for p in paths:
            if not globlib.has_magic(p) and not Path(p).exists():
                raise FileNotFoundError(f"{where}: {p} does not exist")
            if globlib.has_magic(p) and not globlib.glob(p, recursive=True):
                raise FileNotFoundError(f"{where}: no file matches {p}")
    if typ == "hf" and not isinstance(opts.get("dataset"), str):
        raise ValueError(f"{where}: 'dataset' (a Hugging Face dataset id or a local folder) is required")
    cap = opts.get("max_documents")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ValueError(f"{where}: max_documents must be a positive integer, got {cap!r}")
    if typ == "instructions" and opts.get("kind", "docstring") not in ("docstring", "math", "handbook"):
        raise ValueError(f"{where}: kind must be docstring, math or handbook, got {opts['kind']!r}")
    _check_math_options(opts, typ, where)
    lic = spec.get("license")
    if lic is None:
        if typ in BUILTIN:
            key = "fortunes_it" if typ == "fortunes" and opts.get("lang") == "it" else typ
            lic = offline.LICENSES[key]
        elif typ == "hf" and opts["dataset"] in HF_LICENSES:
            lic = HF_LICENSES[opts["dataset"]]
        else:
            raise ValueError(f"{where}: state the data's licence with license = \"...\"")
    return Source(name=name, type=typ, weight=float(weight), license=str(lic), options=opts)


def _check_math_options(opts: dict, typ: str, where: str) -> None:
    """`modules` / `difficulty` of a generated math source (type math, or instructions of kind math)."""
    if "modules" not in opts and "difficulty" not in opts:
        return
    if not (typ == "math" or (typ == "instructions" and opts.get("kind") == "math")):
        raise ValueError(f"{where}: modules and difficulty apply to generated math only (type \"math\", or "
                         "\"instructions\" with kind = \"math\")")
    mods = opts.get("modules")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise ValueError(f"{where}: modules must list mathematics_dataset module names, e.g. "
                         "[\"arithmetic__add_or_sub\"]")
    from .mathgen import DIFFICULTIES, math_modules

    try:
        known = math_modules()
    except RuntimeError:  # mathematics-dataset missing: the source is dropped as unavailable, names unchecked
        known = None
    bad = [m for m in mods if known is not None and m not in known]
    if bad:
        raise ValueError(f"{where}: unknown math module(s) {bad}; known: {', '.join(known)}")
    if opts.get("difficulty", "easy") not in DIFFICULTIES:
        raise ValueError(f"{where}: difficulty must be one of {', '.join(DIFFICULTIES)}, got {opts['difficulty']!r}")


# ---- files -------------------------------------------------------------------------------------------------------
def expand_paths(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        hits = sorted(globlib.glob(p, recursive=True)) if globlib.has_magic(p) else [p]
        for h in map(Path, hits):
            if h.is_dir():
                out += sorted(f for f in h.rglob("*") if f.is_file() and _readable_kind(f))
            elif h.exists():
                out.append(h)
            else:
                raise FileNotFoundError(f"{h} does not exist")
    return out


def _readable_kind(f: Path) -> bool:
    s = f.suffix.lower()
    return s in TEXT_EXTS or s in CODE_EXTS or s in {".jsonl", ".parquet"}


def file_documents(paths: list[str], text_field: str | None = None, chat: bool = False,
                   rng: random.Random | None = None) -> Iterator:
    files = expand_paths(paths)
    if rng is not None:
        rng.shuffle(files)
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from jsonl_documents(f, text_field or (None if chat else "text"), chat)
        elif suffix == ".parquet":
            yield from parquet_documents(f, text_field or (None if chat else "text"), chat)
        else:
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise FileNotFoundError(f"{f}: cannot read ({e.strerror})") from None
            try:  # newlines translated as read_text does (universal newlines)
                yield raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
            except UnicodeDecodeError as e:
                yield BadRecord(f"{f}:{utf8_line(raw, e.start)}", utf8_problem(e, raw))


def jsonl_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, line) of a binary file, or (line number, its length in bytes) for a line over `limit` bytes,
    which is read through in 1 MiB pieces and never held: memory stays under ~2x `limit` whatever the file holds."""
    lineno = 0
    while raw := fh.readline(limit + 1):
        lineno += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield lineno, raw
            continue
        n = len(raw)
        del raw
        while (piece := fh.readline(1 << 20)) and not piece.endswith(b"\n"):
            n += len(piece)
        yield lineno, n + len(piece)


def jsonl_documents(f: Path, text_field: str | None, chat: bool) -> Iterator:
    limit = MAX_CHAT_RECORD_BYTES if chat else MAX_TEXT_RECORD_BYTES
    with open(f, "rb") as fh:  # decoded line by line, so a bad byte names its line and the others still load
        for lineno, raw in jsonl_lines(fh, limit):
            where = f"{f}:{lineno}"
            if isinstance(raw, int):
                yield BadRecord(where, f"a line of {raw:,} bytes, over the limit of {limit:,} bytes for one "
                                f"{'conversation' if chat else 'document'} (not read); split or shorten it")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(where, utf8_problem(e, raw, 0))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(where, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                yield BadRecord(where, "JSON nested too deeply to read (arrays or objects inside each other "
                                "beyond Python's recursion limit); flatten the record")
                continue
            try:
                yield row_document(row, text_field, chat, where)
            except BadRecord as e:
                yield e


def parquet_documents(f: Path, text_field: str | None, chat: bool) -> Iterator:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(f)
    row_no = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            try:
                yield row_document(row, text_field, chat, f"{f}: row {row_no}")
            except BadRecord as e:
                yield e


def row_document(row: object, text_field: str | None, chat: bool, where: str) -> str | Conversation:
    """A record -> a text document, or a conversation when `chat`. Raises BadRecord naming the field."""
    if not isinstance(row, dict):
        raise BadRecord(where, f"expected a JSON object, got {type(row).__name__}")
    if chat:
        key = text_field or "messages"
        msgs = row.get(key)
        if msgs is None and "conversations" in row:
            key, msgs = "conversations", row["conversations"]
        if not isinstance(msgs, list):
            raise BadRecord(where, f"field {text_field or 'messages'!r} must be a list of messages")
        conv = Conversation(_message(m) for m in msgs)
        for i, (m, orig) in enumerate(zip(conv, msgs)):
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                _check_surrogates(m["content"], where, f"{key}[{i}].{'content' if 'content' in orig else 'value'}")
        conv.where = where
        return conv
    if text_field:
        if text_field not in row:
            raise BadRecord(where, f"missing field {text_field!r} (fields: {', '.join(map(str, row))})")
        value = row[text_field]
    else:
        value = next((row[k] for k in ("text", "content") if isinstance(row.get(k), str)), None)
        if value is None:
            for k in ("messages", "conversations"):
                if isinstance(row.get(k), list):
                    value = flatten_chat([_message(m) for m in row[k]])
                    break
            else:
                value = "\n\n".join(v for v in row.values() if isinstance(v, str) and v.strip())
    if isinstance(value, list):
        value = flatten_chat([_message(m) for m in value])
    if not isinstance(value, str):
        raise BadRecord(where, f"field {text_field!r} must be a string, got {type(value).__name__}")
    _check_surrogates(value, where, text_field or "the text")
    return value


def _check_surrogates(text: str, where: str, field_name: str) -> None:
    """JSON's \\ud800 escape reads as half a UTF-16 pair, which is no character: no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(where, f"{field_name} holds an unpaired surrogate (\\u{ord(text[e.start]):04x} at character "
                        f"{e.start + 1}); fix the text (each \\ud800-\\udbff escape must be followed by one of "
                        "\\udc00-\\udfff)") from None


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


def _message(m: object) -> dict:
    """ShareGPT {'from', 'value'} or OpenAI {'role', 'content'} -> {'role', 'content'} (validated later)."""
    if isinstance(m, dict) and "role" not in m and "from" in m:
        role = str(m["from"])
        return {"role": _ROLE_ALIASES.get(role, role), "content": m.get("value")}
    return m


def flatten_chat(messages: list[dict]) -> str:
    return "\n".join(f"{str(m.get('role', '')).capitalize()}: {m.get('content', '')}" for m in messages
                     if isinstance(m, dict)) + "\n"


# ---- Hugging Face datasets --------------------------------------------------------------------------------------
def hf_documents(dataset: str, config: str | None = None, split: str = "train", text_field: str | None = None,
                 chat: bool = False, data_files: str | list[str] | None = None) -> Iterator:
    """Stream a Hugging Face dataset (or a local folder of parquet/jsonl files) row by row."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError("HF sources need `pip install datasets` (extra quark[data])") from None
    kwargs = {"split": split, "streaming": True}
    if data_files is not None:
        kwargs["data_files"] = data_files
    try:
        ds = datasets.load_dataset(dataset, config, **kwargs)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - offline, unknown dataset, bad folder: one clear line, not a traceback
        raise RuntimeError(f"Hugging Face dataset {dataset!r} (config {config!r}, split {split!r}) cannot be read: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if first is None:
        return
    for i, row in enumerate(itertools.chain([first], rows)):
        try:
            yield row_document(row, text_field, chat, f"{dataset}[{split}] row {i}")
        except BadRecord as e:
            yield e
