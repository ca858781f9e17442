"""The package's layer order (DESIGN.md, "Layers"): a module imports only from its own layer or the layers below it,
and the math layers do not import Lightning. Read from the source with ``ast`` (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_pl"

#: Top to bottom; names on one line share a layer. ``__main__`` is the entry point, above everything.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("callbacks",),
    ("models",),
    ("pipelines",),
    ("metrics",),
    ("data",),
    ("conditioning",),
    ("guidance",),
    ("samplers",),
    ("losses", "loss_parts", "likelihood"),
    ("parameterization",),
    ("processes",),
    ("nets",),
    ("core",),
)
#: Usable from a notebook with a plain nn.Module: no Lightning below these layers' tops (DESIGN.md).
LIGHTNING_FREE = ("processes", "samplers", "guidance", "conditioning", "losses", "loss_parts", "likelihood", "parameterization",
                  "nets", "core")


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a ``diffusion_pl`` module (None for other packages and the package root)."""
    parts = module.split(".")
    if parts[0] != "diffusion_pl" or len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of DESIGN.md: add its package to LAYERS in this test")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, nested ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute diffusion_pl path")
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a file under ``root`` (the folder that holds ``diffusion_pl/``)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(path: Path, root: Path) -> list[str]:
    """"file:line imports module (why)" for each import of a module in a layer above the file's own."""
    own = layer_of(module_name(path, root))
    return [f"{path.relative_to(root)}:{line} imports {module} ({'/'.join(LAYERS[layer])} is above "
            f"{'/'.join(LAYERS[own])})"
            for line, module in imports_of(path)
            if own is not None and (layer := layer_of(module)) is not None and layer < own]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_every_layer() -> None:
    """The walk sees the package: each layer of DESIGN.md has at least one module (guards an empty glob)."""
    seen = {layer_of(module_name(path, PACKAGE.parent)) for path in SOURCES}
    assert seen >= set(range(len(LAYERS)))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE.parent)))
def test_imports_point_down_the_layers(path: Path) -> None:
    upward = upward_imports(path, PACKAGE.parent)
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", [path for path in SOURCES if path.relative_to(PACKAGE).parts[0].removesuffix(".py")
                                  in LIGHTNING_FREE], ids=lambda path: str(path.relative_to(PACKAGE.parent)))
def test_math_layers_do_not_import_lightning(path: Path) -> None:
    lightning = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}" for line, module in imports_of(path)
                 if module.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not lightning, "\n".join(lightning)


def test_the_check_names_an_upward_import(tmp_path: Path) -> None:
    """The check fails on an upward import and names the file, line and module."""
    source = tmp_path / "diffusion_pl" / "processes" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("import torch\n\n\ndef f():\n    from diffusion_pl.models import DiffusionModule\n")
    assert upward_imports(source, tmp_path) == [
        "diffusion_pl/processes/bad.py:5 imports diffusion_pl.models (models is above processes)"]
    source.write_text("from diffusion_pl.core.tensors import append_dims\nfrom diffusion_pl.processes.base import X\n")
    assert upward_imports(source, tmp_path) == []
