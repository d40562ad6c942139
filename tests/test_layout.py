"""The core library never imports the lab (florence_vl_hf.lab): checked on the source of every core module, lazy
imports inside functions included, and on what importing the core loads."""

import ast
import subprocess
import sys
from pathlib import Path

import florence_vl_hf

PACKAGE = Path(florence_vl_hf.__file__).parent
LAB = "florence_vl_hf.lab"


def module_name(path: Path) -> str:
    parts = ("florence_vl_hf",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved against its package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def core_sources() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if "lab" not in path.relative_to(PACKAGE).parts]


def test_resolving_imports_finds_the_lab():
    lab_cli = PACKAGE / "lab" / "cli.py"
    assert "florence_vl_hf.lab.fixture.make_fixture" in imported_modules(lab_cli)  # `from .fixture import ...`
    assert "florence_vl_hf.cli.DEMO_QUESTION" in imported_modules(lab_cli)  # `from ..cli import ...`


def test_the_core_imports_nothing_from_the_lab():
    sources = core_sources()
    assert len(sources) > 30 and PACKAGE / "training" / "api.py" in sources
    offending = {
        module_name(path): sorted(m for m in imported_modules(path) if m == LAB or m.startswith(LAB + "."))
        for path in sources
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_importing_the_core_loads_no_lab_module():
    core_modules = sorted({module_name(path) for path in core_sources()} - {"florence_vl_hf.__main__"})
    code = (
        "import importlib, sys\n"
        f"for name in {core_modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LAB!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_lab_commands_are_registered_through_the_entry_point():
    from florence_vl_hf.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo-tiny", "convert", "push", "serve", "train", "bench"} <= set(commands)  # the core's
    assert {"demo", "make-fixture", "make-shapes-data", "train-tiny", "bundle-tiny", "ablations", "eval-shapes",
            "alignment"} <= set(commands)  # the lab's  # fmt: skip
