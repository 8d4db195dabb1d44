"""The layering of docs/architecture.md, checked: which package may import which, and that loading a
config (`rpt config`) stays free of the heavy libraries (torch ~1.6 s, numba) the stages use to work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# The framework knows no stage: a registry (stages.REGISTRY) is handed to it with each config, and it
# imports the stage modules by name (importlib) from there. The face (app/: the CLI and the flows) is
# what imports stages; nothing below it imports the face.


def _imports(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement of a file (relative imports: skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if module_level_only:  # what runs on import: top-level statements (an `if`, a `try`), not function bodies
        nodes = [
            n
            for top in tree.body
            if not isinstance(top, ast.FunctionDef | ast.ClassDef)
            for n in ast.walk(top)
        ]
    else:
        nodes = list(ast.walk(tree))
    out = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.append((n.lineno, n.module))
    return out


def _top(module: str) -> str:
    return module.split(".")[0]


def test_libraries_import_nothing_of_the_pipeline():
    """retrieval/ and model/ take arrays and tensors: no artifacts, stages, configs or flows."""
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for pkg in ("retrieval", "model")
        for p in sorted((ROOT / pkg).glob("**/*.py"))
        for line, mod in _imports(p)
        if _top(mod) in ("pipeline", "stages", "app")
    ]
    assert not bad, "\n".join(bad)


def test_the_framework_imports_no_stage_and_no_face():
    """pipeline/ imports neither stages nor app/, at any level (a function body included)."""
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in sorted((ROOT / "pipeline").glob("**/*.py"))
        for line, mod in _imports(p)
        if _top(mod) in ("stages", "app")
    ]
    assert not bad, "\n".join(bad)


def test_only_the_face_imports_the_face():
    """app/ (CLI, flows) sits on top: no framework, stage or library module imports it."""
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for pkg in ("pipeline", "stages", "retrieval", "model", "data")
        for p in sorted((ROOT / pkg).glob("**/*.py"))
        for line, mod in _imports(p)
        if _top(mod) == "app"
    ]
    assert not bad, "\n".join(bad)


def test_rpt_config_imports_neither_torch_nor_numba():
    """`rpt config` loads every stage's Config (the registry imports the stage modules): the stage
    modules must import their kernels and models inside the functions that run them."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from app.cli import app\n"
        f"r = CliRunner().invoke(app, ['config', '-c', {str(DEMO)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'numba', 'faiss') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_retrieval_agrees_with_the_pipeline_formats():
    """retrieval/ spells out the pad value and the document-causal rule instead of importing them."""
    from pipeline.formats import NEIGHBOR_PAD, causal_retrievable
    from retrieval import exact, ranking

    assert exact.NEIGHBOR_PAD == ranking.NEIGHBOR_PAD == NEIGHBOR_PAD
    torch = __import__("torch")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    for excl in (0, 3):
        pos, _ = exact.causal_document_search(x, 50, excl, "ip")
        for i in range(40):
            got = sorted(p for p in pos[i] if p != NEIGHBOR_PAD)
            assert got == [j for j in range(40) if causal_retrievable(i, j, excl)]
