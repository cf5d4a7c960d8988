"""The house rules that keep the layer picture true (docs/architecture.md), checked on the source itself.

The import layers and the absence of import circles are import-linter contracts in pyproject.toml
(``lint-imports``, run by ``make test``); this file runs them too and checks what they cannot see.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "segdist"
MAX_LINES = 450


def modules() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    return files


def test_the_layer_contract_holds():
    lint = Path(sys.executable).parent / "lint-imports"
    p = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 kept, 0 broken" in p.stdout


def test_the_documented_layer_picture_is_the_checked_one():
    """docs/architecture.md draws the layers that pyproject.toml's contract checks, and every module is in one."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    checked = [[m.strip().removeprefix("segdist.") for m in layer.split("|")]
               for c in contracts if c["type"] == "layers" for layer in c["layers"]]
    doc = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"## The import layers \(checked\).*?```\n(.*?)```", doc, re.S).group(1)
    drawn = [[m.strip() for m in line.split("|")] for line in block.splitlines() if line.strip()]
    assert drawn == checked
    top = {f.relative_to(PACKAGE).parts[0].removesuffix(".py") for f in modules()} - {"__init__", "__main__"}
    assert top == {m for layer in checked for m in layer}


def test_no_module_is_over_the_line_limit():
    long = {str(f.relative_to(REPO)): n for f in modules() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_private_name_is_imported_from_another_module():
    found = []
    for f in modules():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("segdist")):
                found += [f"{f.relative_to(REPO)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_function_local_imports_say_why():
    """Imports inside functions are allowed where they keep a heavy import off a fast path; each says so in a
    comment on its line or the line above (or is one of a block of imports whose first line does)."""
    silent = []
    for f in modules():
        lines = f.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[max(0, node.lineno - 4):node.lineno - 1]
                    if "#" not in here and not any("#" in line for line in above):
                        silent.append(f"{f.relative_to(REPO)}:{node.lineno} {here.strip()}")
    assert silent == []


def loaded_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """Which of ``watch`` a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(sorted(m for m in {watch!r} if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return ast.literal_eval(p.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "cv2", "kornia", "timm", "segmentation_models_pytorch", "accelerate", "wandb", "boto3")


def test_the_command_line_loads_no_heavy_library_before_a_command_runs():
    """`segdist --help`, `segdist shards info` or a config typo answer without torch (the parsers read their
    defaults from light modules: infer.options, export.options, memory; the shards parser's from shards.build,
    which loads OpenCV). Before 2026-12-07's fix, importing segdist.cli alone loaded torch, OpenCV and Kornia."""
    assert loaded_after("import segdist.cli", HEAVY) == []
    assert loaded_after("import segdist.cli\nsegdist.cli.build_parser()", tuple(m for m in HEAVY if m != "cv2")) == []


def test_the_data_bench_loads_no_training_stack():
    """`segdist bench data` forks loader workers from its process: no SMP, timm, Accelerate, W&B or boto3 in it."""
    assert loaded_after("import segdist.bench, segdist.bench.data", HEAVY[3:]) == []


@pytest.mark.parametrize("package", ["segdist.shards", "segdist.infer", "segdist.export", "segdist.bench"])
def test_every_name_a_lazy_package_exports_resolves(package):
    """Each name in ``__all__`` of a package that loads names on first use (segdist/lazy.py) is there: a name
    listed under the wrong submodule would otherwise fail only when some user first reads it."""
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert module.__all__ and missing == []
