"""The package's floors, read from the source with `ast`: backends at the bottom (they never import a
method, the evaluation, the service or the CLI), the evaluation's protocol and runner not importing
each other, `ScoreCache` beside the backend contract, and ``import prefsteer`` staying cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prefsteer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (lazy imports and TYPE_CHECKING blocks included),
    relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", sorted((SRC / "backends").rglob("*.py")), ids=lambda p: module_name(p))
def test_backends_import_nothing_above_them(path):
    above = ("prefsteer.methods", "prefsteer.evaluation", "prefsteer.service", "prefsteer.cli")
    bad = sorted(n for n in imports(path) if any(within(n, a) for a in above))
    assert not bad, f"{module_name(path)} imports {bad}: backends sit below the methods and front ends"


def test_protocol_and_runner_do_not_import_each_other():
    protocol, runner = SRC / "evaluation" / "protocol.py", SRC / "evaluation" / "runner.py"
    # the runner reads the protocol (its configuration), never the other way round
    assert not any(within(n, "prefsteer.evaluation.runner") for n in imports(protocol))
    assert any(within(n, "prefsteer.evaluation.protocol") for n in imports(runner))


def defined_classes(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}


def test_score_cache_lives_beside_the_backend_contract():
    assert "ScoreCache" in defined_classes(SRC / "backends" / "cache.py")
    others = [module_name(p) for p in SRC.rglob("*.py")
              if p != SRC / "backends" / "cache.py" and "ScoreCache" in defined_classes(p)]
    assert not others, f"ScoreCache is also defined in {others}"
    assert not any(within(n, "prefsteer.storage") for n in imports(SRC / "backends" / "cache.py"))


def test_guide_kinds_are_registered_inside_backends():
    from prefsteer.backends.guides import guide_kind

    for name in ("cliper", "drift"):
        assert guide_kind(name).name == name
    with pytest.raises(ValueError, match="unknown guide kind"):
        guide_kind("nope")
    # the methods' names are the backends' objects, re-exported
    from prefsteer.backends.guides import cliper, drift
    from prefsteer.methods import drift as method_drift
    from prefsteer.methods.cliper import guidance, heads

    assert guidance.CliperGuide is cliper.CliperGuide and heads.HeadBank is cliper.HeadBank
    assert method_drift.DriftGuide is drift.DriftGuide and method_drift.combine_logits is drift.combine_logits


def test_importing_prefsteer_loads_no_torch():
    out = subprocess.run([sys.executable, "-c", "import prefsteer, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
