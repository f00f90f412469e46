"""The remote-code file set of an HF export: `configuration_quark.py`, `modeling_quark.py` and every package
module they import relatively (transitively), copied verbatim beside them; and the third-party modules those files
import, which the model card lists for the reader who reviews remote code before running it.

Choices:
- Relative imports are found with the same patterns transformers' `dynamic_module_utils` follows (indented and
  lazy imports included), so the set is exactly what transformers will look for in the folder.
- Its own module (not `export`), because both the export and the model card (`card`) need it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
TEMPLATES = {"configuration_quark": PACKAGE / "hf" / "configuration_quark.py",
             "modeling_quark": PACKAGE / "hf" / "modeling_quark.py"}


def _relative_imports(path: Path) -> set[str]:
    text = path.read_text()
    return set(re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)
               + re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE))


def remote_code_files() -> dict[str, Path]:
    """Export file name -> package source for the two remote-code files and every sibling they import,
    transitively, exactly as transformers will look for them. The siblings are copied verbatim."""
    files, todo = {}, list(TEMPLATES)
    while todo:
        mod = todo.pop()
        if f"{mod}.py" in files:
            continue
        src = TEMPLATES.get(mod, PACKAGE / f"{mod}.py")
        if not src.exists():
            raise RuntimeError(f"remote code needs {mod}.py, which is not in {PACKAGE}")
        files[f"{mod}.py"] = src
        todo += sorted(_relative_imports(src))
    return files


def remote_code_imports() -> list[str]:
    """Top-level modules (beyond the standard library and each other) the exported code files import."""
    mods = set()
    for src in remote_code_files().values():
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return sorted(mods - set(sys.stdlib_module_names) - {"__future__"})
