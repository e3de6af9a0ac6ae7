"""The package's shape: no import cycles between its modules (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "addons" / "aibridge_gw"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            for c in candidates:
                if c in modules and c != name:
                    graph[name].add(c)
                    break
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_package_works_installed_not_only_from_a_checkout():
    """Every data file the code reads ships as package data, and no module finds files through the checkout."""
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["aibridge_gw"]
    data = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts]
    assert data, "expected the dashboard"
    unshipped = [str(p.relative_to(PACKAGE)) for p in data
                 if not any(p.relative_to(PACKAGE).match(pat) for pat in patterns)]
    assert unshipped == []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "parents[2]" not in text and "PROJECT_ROOT" not in text, path


def test_files_are_found_from_aibridge_home_when_nothing_names_them(tmp_path, monkeypatch):
    from aibridge_gw.certs import default_confdir
    from aibridge_gw.config import aibridge_home, resolve_config_path

    monkeypatch.delenv("AIBRIDGE_CONFIG", raising=False)
    monkeypatch.setenv("AIBRIDGE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert aibridge_home() == tmp_path
    assert resolve_config_path() == tmp_path / "config" / "aibridge.yaml"
    assert default_confdir() == tmp_path / "certs"
    monkeypatch.setenv("AIBRIDGE_CONFIG", str(tmp_path / "elsewhere.yaml"))
    assert resolve_config_path() == tmp_path / "elsewhere.yaml"


# Header names only one provider speaks: they belong in that provider's package (apis/<provider>/), so a provider
# with other auth or framing fits without the pipeline, the loop, capture or logs learning its names.
PROVIDER_HEADERS = ("anthropic-beta", "anthropic-version", "x-amzn-errortype", "x-amz-security-token", "x-amz-date",
                    "x-amz-content-sha256", "x-goog-api-key", "api-key", "openai-organization", "openai-project",
                    "editor-plugin-version")


def test_no_provider_header_is_named_outside_its_providers_package():
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        if "apis" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
                if text.lower() in PROVIDER_HEADERS:
                    leaks.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text!r}")
    assert not leaks, "provider headers named outside apis/:\n" + "\n".join(leaks)


def _slug(title: str) -> str:
    import re

    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_front_door_and_every_link_in_the_docs_resolves():
    import re

    root = PACKAGE.parents[1]
    readme = root / "README.md"
    assert len(readme.read_text().splitlines()) <= 200, "the README is the front door: topics go to docs/"
    broken = []
    for page in [readme, *sorted((root / "docs").glob("*.md")), root / "deploy" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in {
                    _slug(line.lstrip("#")) for line in file.read_text().splitlines() if line.startswith("#")}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
