"""The package's shape: no import cycles, no function over 100 lines, every third-party import
declared, one version, a documented layout (docs/development.md) that matches the tree, and a wheel
that installs and runs in a clean environment."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

import fastmlstm

PACKAGE = REPO / "fastmlstm"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, relative level) of every import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names], node.level))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], 0) for a in node.names]
    return found


def _internal_edges() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for module, names, level in _imports(path):
            base = package[: len(package) - level + 1] if level else []
            target = ".".join(base + ([module] if module else [])) if level else module
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            # `from pkg import sub` depends on the submodule; the package itself only when a name
            # imported from it is not a submodule (its __init__ must run to provide it).
            candidates = submodules + ([target] if len(submodules) < len(names) or not names else [])
            for candidate in candidates:
                if candidate in MODULES and candidate != name:
                    edges[name].add(candidate)
    return edges


def test_no_import_cycles_inside_the_package():
    """Lazy imports inside functions count too: a cycle is a cycle whenever it is taken."""
    edges = _internal_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


SOURCE_FILES = sorted({*PACKAGE.rglob("*.py"), REPO / "train.py", *(REPO / "bench").rglob("*.py"),
                       *(p for suffix in ("*.cpp", "*.cu", "*.h", "*.cuh") for p in (REPO / "csrc").rglob(suffix))})


def test_no_source_file_is_longer_than_600_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in SOURCE_FILES
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long


def _cpp_functions(text: str):
    """(name line, length) of every brace block opened at namespace level that is not a namespace:
    the functions (and types) of a C++ file, by brace depth, comments and strings removed."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", '""', text)
    stack, blocks = [], []
    for number, line in enumerate(text.splitlines(), 1):
        for char in line:
            if char == "{":
                namespace = bool(re.match(r"\s*(namespace|extern \"\")", line))
                top = all(kind == "namespace" for kind, _ in stack)
                stack.append(("namespace" if namespace else "block" if top else "inner", number))
            elif char == "}" and stack:
                kind, start = stack.pop()
                if kind == "block":
                    blocks.append((start, number - start + 1))
    return blocks


def test_no_cpp_function_is_longer_than_100_lines():
    long = []
    for path in SOURCE_FILES:
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            long += [f"{path.relative_to(REPO)}:{start} ({n} lines)" for start, n in _cpp_functions(path.read_text())
                     if n > 100]
    assert not long, long


def test_no_function_is_longer_than_100_lines():
    files = [p for p in SOURCE_FILES if p.suffix == ".py"]
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """distribution name -> where it is declared ("core" or the extra's name)."""
    project = PYPROJECT["project"]
    declared = {_requirement_name(s): "core" for s in project["dependencies"]}
    for extra, specs in project.get("optional-dependencies", {}).items():
        for spec in specs:
            declared.setdefault(_requirement_name(spec), extra)
    return declared


def _third_party_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the package files importing it (``require("x", ...)`` too)."""
    used: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [m for m, _, level in _imports(path) if not level]
        names += [node.args[0].value for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                  and node.args and isinstance(node.args[0], ast.Constant)]
        for module in names:
            top = module.split(".")[0]
            if top and top != "fastmlstm" and top not in sys.stdlib_module_names:
                used.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return used


def test_every_third_party_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in _third_party_modules().items():
        names = [d.lower().replace("_", "-") for d in distributions.get(module, [module])]
        if not any(n in declared for n in names):
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    # The core install must not need the plotting extra: matplotlib is imported only through require().
    assert declared["matplotlib"] != "core"


def test_one_version_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastmlstm._version.__version__"}
    hits = [p for p in PACKAGE.rglob("*.py") if re.search(r"__version__\s*=", p.read_text())]
    assert hits == [PACKAGE / "_version.py"], hits


def test_documented_layout_matches_the_tree():
    """docs/development.md's "Repository layout": every path it lists exists, and it lists every
    top-level module and package of fastmlstm/."""
    text = (REPO / "docs" / "development.md").read_text()
    section = text[text.index("## Repository layout"):]
    section = section[: section.index("\n## ", 5)]
    listed = re.findall(r"^ {4}(\S+)", section, flags=re.M)
    assert listed, "docs/development.md's layout section lists no paths (4-space indented lines)"
    for entry in listed:
        assert (REPO / entry).exists(), f"docs/development.md's layout lists {entry}, which does not exist"
    top = {p.name for p in PACKAGE.iterdir() if p.name != "__init__.py" and not p.name.startswith("__pycache__")
           and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    named = {Path(e).name for e in listed if e.startswith("fastmlstm/") and e.count("/") == 1}
    named |= {e.split("/")[1] for e in listed if e.startswith("fastmlstm/") and e.count("/") >= 2}
    assert top <= named, f"modules missing from docs/development.md's layout: {sorted(top - named)}"


def _copy_project(destination: Path) -> Path:
    destination.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(REPO / name, destination)
    shutil.copytree(REPO / "csrc", destination / "csrc")
    shutil.copytree(PACKAGE, destination / "fastmlstm", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return destination


def test_wheel_installs_and_runs_in_a_clean_environment(tmp_path):
    """Build the wheel, install it with its declared dependencies into a fresh virtual environment
    (no system site-packages, the checkout out of reach), and run the console script."""
    project = _copy_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FASTMLSTM_BACKEND")}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(project)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel, = (tmp_path / "dist").glob("fastmlstm-*.whl")
    assert wheel.name.startswith(f"fastmlstm-{fastmlstm.__version__}-"), wheel.name

    venv.create(tmp_path / "venv", with_pip=True, system_site_packages=False)
    bin_dir = tmp_path / "venv" / "bin"
    # torch pinned as the README says (a local file here); the rest comes from the wheel's metadata.
    installed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    def run(*args):
        done = subprocess.run([str(bin_dir / "fastmlstm"), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = subprocess.run([str(bin_dir / "python"), "-c", "import fastmlstm; print(fastmlstm.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where
    info = run("info")
    assert f"fastmlstm: {fastmlstm.__version__}" in info and "reference@cpu" in info
    assert "--preset {paper,tiny}" in run("train", "--help")
