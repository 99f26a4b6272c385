"""The documents tell the truth about the tree: README.md stays short, runs CI and links every file
of docs/; every relative link in README.md and docs/ reaches a file (and, with an anchor, a heading
of it); every environment variable the package reads is in the README's table; the sections that
the code's messages cite exist; the measured tables written by hand match their results files."""

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
REQUIRED_DOCS = ("MODEL.md", "backends.md", "training.md", "probe.md", "benchmarks.md", "development.md")
MAX_README_LINES = 250
DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]
ENV_NAME = re.compile(r"FASTMLSTM_[A-Z0-9_]+")


def _report():
    """bench/report.py, whose number formats the hand-written tables follow."""
    spec = importlib.util.spec_from_file_location("_bench_report_for_docs", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FENCED = re.compile(r"^\s*```.*?^\s*```", flags=re.M | re.S)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (whose brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "``", FENCED.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (a repeated heading gets -1, -2, ...)."""
    anchors, counts = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        anchors.add(f"{slug}-{n}" if n else slug)
        counts[slug] = n + 1
    return anchors


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; at most {MAX_README_LINES} (move detail to docs/)"


def test_readme_links_every_document():
    links = set(re.findall(r"\]\((docs/[^)#\s]+)", _prose(README.read_text())))
    present = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    missing = [name for name in REQUIRED_DOCS if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"
    assert not sorted(present - links), f"README.md does not link {sorted(present - links)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(document):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(document.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if REPO not in file.parents and file != REPO:
            broken.append(f"{target} (outside the repository)")
        elif not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(REPO)})")
    assert not broken, f"{document.relative_to(REPO)}: broken links: {broken}"


def _is_environ(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _read_names(tree) -> set[str]:
    """Names read from the environment directly: os.environ.get("X"), os.environ["X"], os.getenv("X")."""
    names = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            reads = isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") \
                and _is_environ(func.value)
            getenv = (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                isinstance(func, ast.Name) and func.id == "getenv")
            if reads or getenv:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _environment_variables() -> set[str]:
    """Every variable the package reads: the FASTMLSTM_* names (often constants passed on), and the
    names read directly, in fastmlstm/ and setup.py."""
    names = set()
    for path in [*sorted((REPO / "fastmlstm").rglob("*.py")), REPO / "setup.py"]:
        tree = ast.parse(path.read_text())
        names |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str) and ENV_NAME.fullmatch(node.value)}
        names |= _read_names(tree)
    return names


def test_every_environment_variable_is_in_the_readme_table():
    table = _section(README.read_text(), "Environment variables")
    listed = set()
    for row in re.findall(r"^\|([^|\n]*)\|", table, flags=re.M):
        listed |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", row))
    read = _environment_variables()
    assert {"FASTMLSTM_BACKEND", "FASTMLSTM_CPU_BF16", "TRITON_INTERPRET", "WORLD_SIZE"} <= read  # the scan works
    missing = sorted(read - listed)
    assert not missing, f"read by the package but missing from the README's environment table: {missing}"


def test_the_sections_the_code_cites_exist():
    """Messages and docstrings cite docs/<file>.md, optionally with a section ('CUDA extension')."""
    cited = []
    for path in [*(REPO / "fastmlstm").rglob("*.py"), *(REPO / "bench").rglob("*.py"), *(REPO / "csrc").rglob("*.*")]:
        for name, section in re.findall(r"docs/([\w.-]+\.md)(?:, '([^']+)')?", path.read_text()):
            cited.append((path.relative_to(REPO), name, section))
    assert any(section for *_, section in cited), "the scan should find the backends' build messages"
    wrong = []
    for path, name, section in cited:
        target = DOCS / name
        if not target.is_file():
            wrong.append(f"{path} cites docs/{name}, which does not exist")
        elif section and not re.search(rf"^#+ {re.escape(section)}\s*$", target.read_text(), flags=re.M):
            wrong.append(f"{path} cites docs/{name}, '{section}', which is not a heading there")
    assert not wrong, wrong


def test_the_ci_block_runs_the_tests():
    text = README.read_text()
    assert text.count("<!-- ci:begin") == 1 and text.count("<!-- ci:end -->") == 1
    block = text[text.index("<!-- ci:begin"): text.index("<!-- ci:end -->")]
    commands = [line for line in block.splitlines()[1:] if line and not line.startswith("```")]
    assert any(line.startswith("pip install") for line in commands)
    assert any("pytest" in line for line in commands)


def _rows(table: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``table``, as stripped cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")]
    return rows[2:]


def test_the_readme_speed_table_is_its_results_file():
    report = _report()
    section = _section(README.read_text(), "Speed")
    (path,) = set(re.findall(r"bench/results/[\w.+-]+\.json", section))
    doc = json.loads((REPO / path).read_text())
    assert doc["command"] in section and doc["date"] in section and doc["commit"][:10] in section
    H = int(re.search(r"H = (\d+)", section).group(1))
    records = {(r["impl"], r["mode"], r["dtype"], r["B"]): r for r in doc["results"] if r["H"] == H}
    rows = _rows(section)
    assert len(rows) >= 3
    for mode, dtype, B, fast, lstm, rate, speedup in rows:
        mine, theirs = (records[(impl, mode, dtype, int(B))] for impl in ("fastmlstm-cpu", "nn-lstm"))
        assert [fast, lstm] == [report._ms(r["median_ms"]) for r in (mine, theirs)], (mode, dtype, B)
        assert rate == report._rate(mine["chars_per_s"]), (mode, dtype, B)
        assert speedup == f"{theirs['median_ms'] / mine['median_ms']:.2f}x", (mode, dtype, B)


def test_the_weight_cache_table_is_its_results_file():
    section = _section((DOCS / "benchmarks.md").read_text(), "The strict weight cache")
    (path,) = set(re.findall(r"bench/results/cpu-step-[\w.+-]+\.json", section))
    cases = {c["H"]: c for c in json.loads((REPO / path).read_text())["cases"]}
    keys = ("fastmlstm float32 cache=on", "fastmlstm float32 cache=strict", "fastmlstm float32 cache=off",
            "fastmlstm bfloat16 cache=on", "nn-lstm float32")
    rows = _rows(section)
    assert len(rows) == len(cases)
    for H, *cells, ratio in rows:
        case = cases[int(H)]
        assert cells == [str(case["ms_per_step"][k]) for k in keys], H
        assert ratio == f"{case['ratios']['strict / on, float32']}x", H


def test_the_cpu_targets_table_is_its_results_file():
    section = _section((DOCS / "benchmarks.md").read_text(), "CPU targets on AVX-512-BF16 (issue 24)")
    (path,) = set(re.findall(r"bench/results/[\w.+-]+\.md", section))
    results = (REPO / path).read_text()
    json_doc = json.loads((REPO / path).with_suffix(".json").read_text())
    assert json_doc["command"] in section and json_doc["date"] in section and json_doc["commit"][:10] in section
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len(table) >= 3
    for line in table:
        assert line in results.splitlines(), line
