"""The package layering, checked on every import statement (function-level ones too).

`rewards` needs nothing of the others; `distill` and `rl` use `reason` and `rewards`
and never each other; `reason` imports a stage only in its CLI (reason/cli.py), and
nobody imports another package's `_private` name.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reason", "rewards", "distill", "rl")
ALLOWED = {  # importer package -> packages it may import
    "rewards": {"rewards"},
    "reason": {"reason", "rewards"},
    "distill": {"distill", "reason", "rewards"},
    "rl": {"rl", "reason", "rewards"},
}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) for every import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def violations(path: Path, root: Path = ROOT) -> list[str]:
    own = path.relative_to(root).parts[0]
    bad = []
    for line, module, names in imports(path):
        top = module.split(".")[0]
        if top not in PACKAGES:
            continue
        where = f"{path.relative_to(root)}:{line}: {module}"
        if top not in ALLOWED[own] and path != root / "reason" / "cli.py":
            bad.append(f"{where}: {own} must not import {top}")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if top != own and private:
            bad.append(f"{where}: imports {top}'s private {', '.join(private)}")
    return bad


def test_rules_catch_what_they_should(tmp_path):
    (tmp_path / "rewards").mkdir()
    bad = tmp_path / "rewards" / "x.py"
    bad.write_text("def f():\n    from distill.sft import train_sft\n    from reason.records import _line\n")
    found = violations(bad, tmp_path)
    assert len(found) == 3, found  # rewards -> distill, rewards -> reason, and reason's private name


def test_every_module_respects_the_layering():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40
    found = [v for p in files for v in violations(p)]
    assert not found, "\n".join(found)
