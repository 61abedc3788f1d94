"""The import rule of docs/ARCHITECTURE.md, read from the source with `ast`: every `import` of a package module,
lazy ones inside functions included, must go from a layer to one it may use. A new module must be placed in a
layer here (and in the document) before it can pass."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "msf_scale"

LAYER_OF = {   # top-level module or subpackage of msf_scale -> its layer (docs/ARCHITECTURE.md, "Layers")
    "__init__": "foundation", "catalog": "foundation", "config": "foundation",
    "ops": "ops",
    "data": "data",
    "models": "models",
    "distributed": "support", "optim": "support", "ema": "support", "metrics": "support", "checkpoint": "support",
    "export": "run", "evaluate": "run", "weights_import": "run",
    "train": "run", "train_setup": "run", "train_steps": "run",
    "flops": "tools", "inference": "tools", "latency": "tools", "curve": "tools", "report": "tools",
    "predict": "tools", "tune": "tools",
    "cli": "cli",
}
_BELOW_TOOLS = {"foundation", "ops", "data", "models", "support", "run"}
MAY_IMPORT = {   # layer -> the layers its modules may import (its own included)
    "foundation": {"foundation"},
    "ops": {"ops"},
    "data": {"data", "foundation"},
    "models": {"models", "ops", "foundation"},
    "support": {"support", "foundation"},
    "run": _BELOW_TOOLS,
    "tools": _BELOW_TOOLS | {"tools"},
    "cli": _BELOW_TOOLS | {"tools", "cli"},
}


def _unit(path: Path) -> str:
    """msf_scale/ops/scan.py -> "ops"; msf_scale/train.py -> "train"."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def package_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported msf_scale unit) for every import statement of the file, at any depth."""
    module = ".".join(("msf_scale", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from .schema import x / from . import x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "msf_scale" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            elif parts == ["msf_scale"]:   # `from msf_scale import distributed as dist`
                found += [(node.lineno, a.name) for a in node.names]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(path)
        assert src in LAYER_OF, f"{path.relative_to(PACKAGE.parent)} has no layer: add it to LAYER_OF and ARCHITECTURE.md"
        for line, dst in package_imports(path):
            assert dst in LAYER_OF, f"{path}:{line} imports msf_scale.{dst}, which has no layer"
            if LAYER_OF[dst] not in MAY_IMPORT[LAYER_OF[src]]:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} ({LAYER_OF[src]}) imports "
                           f"{dst} ({LAYER_OF[dst]}); {LAYER_OF[src]} may import only {sorted(MAY_IMPORT[LAYER_OF[src]])}")
    return out


def test_every_import_follows_the_layers():
    bad = violations()
    assert not bad, "imports against docs/ARCHITECTURE.md's layers:\n" + "\n".join(bad)


def test_the_rule_reads_lazy_and_relative_imports(tmp_path):
    """The parser itself: an import inside a function and a relative one are seen (a rule that misses them
    would pass any code)."""
    seen = {dst for _, dst in package_imports(PACKAGE / "data" / "loader.py")}
    assert "data" in seen                                  # from .schema import ... (relative)
    seen = {dst for _, dst in package_imports(PACKAGE / "train_setup.py")}
    assert {"weights_import", "models", "data"} <= seen    # weights_import only inside Run.build (lazy)
    seen = {dst for _, dst in package_imports(PACKAGE / "train.py")}
    assert "distributed" in seen                           # from msf_scale import distributed as dist


def test_the_document_names_every_module():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = sorted(u for u in LAYER_OF if u != "__init__" and f"`{u}" not in doc)
    assert not missing, f"docs/ARCHITECTURE.md does not place {missing}"
