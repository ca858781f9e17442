"""Every third-party module the package (and its tools and tests) imports is declared in setup.cfg.

A fresh install gets only what setup.cfg declares: an import whose distribution is missing there works on a machine
where someone installed it by hand and fails for every new user (torch_fidelity did).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    """PEP 503 normalisation of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list (versions, extras, markers and comments dropped)."""
    names = set()
    for line in lines.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalized(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def declared(config_text: str) -> tuple[set[str], set[str]]:
    """(install_requires, install_requires plus every extra) of a setup.cfg."""
    config = configparser.ConfigParser()
    config.read_string(config_text)
    core = requirement_names(config.get("options", "install_requires", fallback=""))
    extras = set(core)
    if config.has_section("options.extras_require"):
        for _, lines in config.items("options.extras_require"):
            extras |= requirement_names(lines)
    return core, extras


def imported_top_modules(folder: Path) -> dict[str, list[str]]:
    """Top-level module -> places ("path:line") of every absolute import in the folder's Python files."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def undeclared(folder: Path, allowed: set[str], local: set[str]) -> list[str]:
    """Imports in ``folder`` of third-party modules that no distribution in ``allowed`` provides."""
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, places in imported_top_modules(folder).items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        provided_by = {normalized(dist) for dist in providers.get(module, [])}
        if not provided_by & allowed:
            missing.append(f"{module} (from {', '.join(sorted(provided_by)) or 'no installed distribution'}) "
                           f"imported at {', '.join(places)}")
    return missing


SETUP_CFG = (ROOT / "setup.cfg").read_text()
CORE, WITH_EXTRAS = declared(SETUP_CFG)
TEST_LOCAL = {module.stem for module in (ROOT / "tests").glob("*.py")}


@pytest.mark.parametrize(("folder", "allowed", "local"), [
    ("diffusion_pl", CORE, {"diffusion_pl"}),
    ("tools", WITH_EXTRAS, {"diffusion_pl"}),  # tools share code through the package, not through each other
    ("tests", WITH_EXTRAS, {"diffusion_pl"} | TEST_LOCAL),
])
def test_every_import_is_declared(folder: str, allowed: set[str], local: set[str]) -> None:
    missing = undeclared(ROOT / folder, allowed, local)
    assert not missing, (f"declare these in setup.cfg ({'install_requires' if folder == 'diffusion_pl' else 'an extra'}"
                         "), or a fresh install fails:\n" + "\n".join(missing))


def test_check_finds_a_dropped_declaration() -> None:
    """The check is not vacuous: without its torch-fidelity line, setup.cfg no longer covers metrics/inception.py."""
    without = "\n".join(line for line in SETUP_CFG.splitlines() if not line.strip().startswith("torch-fidelity"))
    core, _ = declared(without)
    assert "torch-fidelity" in CORE and "torch-fidelity" not in core
    missing = undeclared(ROOT / "diffusion_pl", core, {"diffusion_pl"})
    assert any(entry.startswith("torch_fidelity") and "metrics/inception.py" in entry for entry in missing), missing


def test_clip_imports_in_the_installed_environment() -> None:
    """clip-anytorch imports pkg_resources at import time: the install pins setuptools < 81 so that it still can."""
    import clip

    assert clip.tokenize(["a photo of a shirt"]).shape == (1, 77)
