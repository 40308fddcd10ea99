"""The layout's promises, read from the source: which package may import what (the process boundaries of
badit_serve/__init__.py), and that private vLLM and torch APIs are reached only through
badit_serve/internals.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "badit_serve"


def _modules(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def imported(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(paths: list[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in paths:
        for name in sorted(imported(path)):
            hit = any(name == f or name.startswith(f + ".") for f in forbidden)
            if hit and not any(name == a or name.startswith(a + ".") for a in allowed):
                found.append(f"{_rel(path)} imports {name}")
    return found


def test_imported_sees_function_level_and_from_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\ndef f():\n    from vllm.lora import layers\n")
    assert imported(source) == {"os", "vllm.lora", "vllm.lora.layers"}
    assert len(_violations([source], ("vllm",))) == 2
    assert _violations([source], ("vllm",), allowed=("vllm.lora",)) == []


def test_core_imports_no_engine_or_web_framework() -> None:
    core = _modules(SERVE / "core")
    assert core, "badit_serve/core is empty"
    forbidden = ("vllm", "fastapi", "starlette", "uvicorn", "prometheus_client", "badit_serve", "training")
    assert _violations(core, forbidden, allowed=("badit_serve.core",)) == []


def test_training_imports_only_the_core_of_badit_serve() -> None:
    assert _violations(_modules(ROOT / "training"), ("badit_serve",), allowed=("badit_serve.core",)) == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("api", ("badit_serve.launch", "badit_serve.vllm_models", "training")),
        ("metrics", ("badit_serve.launch", "badit_serve.api", "training")),
        ("vllm_models", ("badit_serve.launch", "badit_serve.api", "badit_serve.metrics", "training")),
        ("launch", ("badit_serve.vllm_models", "training")),
    ],
)
def test_process_packages_import_across_boundaries_only_downwards(package: str, forbidden: tuple) -> None:
    assert _violations(_modules(SERVE / package), forbidden) == []


PRIVATE_MODULES = ("vllm._custom_ops", "torch._dynamo", "torch._inductor", "torch._C")


def _private_uses(path: Path) -> list[str]:
    """Private attribute reads on anything but self/cls (`x._y`, `torch._grouped_mm`) and imports of private
    vLLM / torch modules."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{_rel(path)}:{node.lineno} .{node.attr}")
    found += [f"{_rel(path)} imports {name}" for name in imported(path) if name in PRIVATE_MODULES]
    return found


def test_private_vllm_and_torch_apis_only_through_the_internals_seam() -> None:
    seam = SERVE / "internals.py"
    assert seam.is_file()
    others = [p for p in _modules(SERVE) if p != seam] + _modules(ROOT / "training")
    assert [use for p in others for use in _private_uses(p)] == []
    assert _private_uses(seam), "the seam reaches no private API: the check above would prove nothing"
