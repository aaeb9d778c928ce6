"""Imports run one way: every import in npvae/ (top-level or inside a function, relative or absolute) goes
to a module on the same floor or a lower one.

The floors, top to bottom, are :data:`FLOORS`. Modules map to floors by dotted prefix, so ``npvae.cli``
covers ``npvae/cli.py`` and a package ``npvae/cli/`` alike. The chain cli -> train -> viz -> study ->
objectives -> models -> layers -> ops/conv -> kernels is the architecture; the other modules sit
where their imports and their readers put them:

- registry, backend, checkpoint, gradcheck import nothing of npvae: the foundation.
- _kernels (backend) and rundir (checkpoint's atomic writes) import only the foundation: one floor up.
- penalties and optim are functional core beside ops and conv: pure array functions (penalties'
  forward/backward pairs, built on ops' helpers; the optimizers' fused update rules) over the kernels.
- torch, the PyTorch bridge, reads layers and models, and nothing in the library needs it: one floor
  above the models.
- data (datasets: parsing, finding, downloading, preprocessing; PNG files) sits above the models and
  below the study tools: no model, layer or op reads a dataset (checkpoint's formats are the
  foundation's), while the study tools, the pictures, training and the CLI may all load data.
- memory (the estimate of what a run will allocate) reads the layers' shapes, and the models, data
  and the CLI ask it before they allocate: the layers' floor.
- recipes (the write-ups' systems as they train them) build models and TrainConfigs, and the CLI reads
  them: between the CLI and training.
- npvae itself (``npvae/__init__.py``) re-exports the public API, so it sits on top, with the CLI.

A new module that is on no floor fails the test with the line to add.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "npvae"

FLOORS: tuple[tuple[str, ...], ...] = (  # top to bottom
    ("npvae", "npvae.cli", "npvae.__main__"),  # "npvae": the package's __init__ only, not a prefix
    ("npvae.recipes",),
    ("npvae.train",),
    ("npvae.viz",),
    ("npvae.study",),
    ("npvae.objectives",),
    ("npvae.data",),
    ("npvae.torch",),
    ("npvae.models",),
    ("npvae.layers", "npvae.memory"),
    ("npvae.ops", "npvae.conv", "npvae.penalties", "npvae.optim"),
    ("npvae._kernels", "npvae.rundir"),
    ("npvae.registry", "npvae.backend", "npvae.checkpoint", "npvae.gradcheck"),
)


def floor_of(module: str) -> int | None:
    """The floor of a dotted module name, 0 at the bottom (None: on no floor)."""
    for height, prefixes in enumerate(reversed(FLOORS)):
        for prefix in prefixes:
            if module == prefix or (prefix != "npvae" and module.startswith(prefix + ".")):
                return height
    return None


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``npvae/viz/plots.py`` -> ``npvae.viz.plots``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path = PACKAGE) -> bool:
    """Whether a dotted name under npvae is a module or package (not a name defined inside one)."""
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def npvae_imports(source: str, module: str, is_package: bool, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of an npvae module in ``source``, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "npvae" or alias.name.startswith("npvae."):
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != "npvae" and not base.startswith("npvae."):
                continue
            for alias in node.names:  # `from . import ops` imports a module; `from .models import VAE` a name
                found.append((node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}", root) else base))
    return sorted(set(found))


def upward_imports(root: Path = PACKAGE) -> tuple[list[str], list[str]]:
    """(imports that go up a floor, modules on no floor), each as one readable line."""
    upward, unplaced = [], []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        here = floor_of(module)
        if here is None:
            unplaced.append(f"{path.relative_to(root.parent)}: module {module} is on no floor; add it to "
                            "FLOORS in tests/test_imports.py as low as its imports allow")
            continue
        for line, target in npvae_imports(path.read_text(), module, path.name == "__init__.py", root):
            there = floor_of(target)
            if there is None:
                unplaced.append(f"{path.relative_to(root.parent)}:{line}: imports {target}, which is on no floor")
            elif there > here:
                upward.append(f"{path.relative_to(root.parent)}:{line}: {module} imports {target}, "
                              f"a higher floor ({' / '.join(FLOORS[len(FLOORS) - 1 - there])})")
    return upward, unplaced


def test_every_import_in_npvae_runs_downward():
    upward, unplaced = upward_imports()
    assert not unplaced, "\n".join(unplaced)
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def _tree(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "npvae"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("source, target", [
    ("from ..train import fit\n", "npvae.train"),  # relative, top-level
    ("def f():\n    from npvae.viz import plots\n", "npvae.viz.plots"),  # absolute, inside a function
    ("import npvae.cli\n", "npvae.cli"),
    ("from .. import study\n", "npvae.study"),  # a package imported by name
])
def test_the_check_finds_an_upward_import_however_it_is_written(tmp_path, source, target):
    root = _tree(tmp_path, {"__init__.py": "", "train.py": "", "cli.py": "", "models/__init__.py": "",
                            "models/vae.py": source, "viz/__init__.py": "", "viz/plots.py": "",
                            "study/__init__.py": ""})
    upward, unplaced = upward_imports(root)
    assert not unplaced
    assert len(upward) == 1 and f"npvae.models.vae imports {target}, a higher floor" in upward[0]


def test_the_check_accepts_downward_and_same_floor_imports_and_names_modules_on_no_floor(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "from .cli import main\n", "cli.py": "from . import __version__\n",
                            "conv.py": "from . import ops\nfrom .ops import relu_forward\n", "ops.py": "",
                            "models/__init__.py": "from ..layers import Dense\n", "layers.py": "",
                            "extra.py": ""})
    upward, unplaced = upward_imports(root)
    assert not upward
    assert len(unplaced) == 1 and "module npvae.extra is on no floor" in unplaced[0]
