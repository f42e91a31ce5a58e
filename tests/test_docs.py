"""The documentation: the MkDocs site builds strictly, and no text points at a file that is not there.

Every repository path named in README.md, docs/*.md and the package's docstrings and comments must
exist; the architecture page's module map lists every module of the package.
"""

import ast
import io
import itertools
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

from conftest import REPO

TOP_LEVEL = ("consissr", "configs", "docs", "tests", "benchmarks", "notes", "scripts", "pipelines", r"\.ci")
# a repository path: a top-level folder, then path characters; {a,b} alternatives are expanded
PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(TOP_LEVEL) + r")/(?:[\w.*-]|/|\{[\w.,-]*\})*)")
# a package module named from inside the package (`models/gan.py`), as docstrings and the docs do
MODULE = re.compile(r"(?<![\w./~-])((?:data|models|training|inference|evaluation|experiments)/[\w/]+\.py)\b")
# names that look like repository paths but are not, with what they are
ELSEWHERE = {
    "configs/model/cldm.yaml": "a file of the authors' repository, Gujojo/ConsisSR",
    "consissr/controlnet/": "a folder inside a saved pipeline (convert_authors.py's key table)",
}


def repo_paths(text: str) -> list[str]:
    """Repository paths named in ``text``, as written relative to the root (braces expanded)."""
    found = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".-")
        found.extend(expand_braces(path))
    found.extend("consissr/" + m.group(1) for m in MODULE.finditer(text))
    return found


def expand_braces(path: str) -> list[str]:
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def exists(path: str, root: Path = REPO) -> bool:
    if any(c in path for c in "*?["):
        return any(root.glob(path))
    return (root / path).exists()


def python_texts(path: Path):
    """(line number, line) of every docstring line and comment in a Python file."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                for offset, line in enumerate(doc.splitlines()):
                    yield node.body[0].lineno + offset, line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def documented_texts():
    """(file, line, text) of the README, the docs pages and the package's docstrings and comments."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield path, number, line
    for path in sorted([*(REPO / "consissr").rglob("*.py"), *(REPO / "pipelines").glob("*.py")]):
        for number, text in python_texts(path):
            yield path, number, text


def missing_paths(texts) -> list[str]:
    problems = []
    for path, number, text in texts:
        for named in repo_paths(text):
            if named not in ELSEWHERE and not exists(named):
                problems.append(f"{path.relative_to(REPO)}:{number}: names {named}, which does not exist")
    return problems


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(site)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pages = sorted(p.relative_to(REPO / "docs").with_suffix("") for p in (REPO / "docs").glob("*.md"))
    for page in pages:
        built = site / ("index.html" if page.name == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built into {built}"


def test_every_repository_path_named_in_the_docs_and_docstrings_exists():
    problems = missing_paths(documented_texts())
    assert not problems, "dangling pointers:\n" + "\n".join(problems)


def test_the_path_check_finds_a_dangling_pointer_and_accepts_real_ones():
    text = ("Loading is the pipeline's own (notes/README-inference.md says why); see "
            "consissr/inference/pipeline.py, `models/gan.py: bilinear_init`, consissr/models/sd_configs/ "
            "and `data/models/{backbone,gan}/`, tests/test_{docs,inference}.py.")
    assert repo_paths(text) == ["notes/README-inference.md", "consissr/inference/pipeline.py",
                                "consissr/models/sd_configs/", "tests/test_docs.py", "tests/test_inference.py",
                                "consissr/models/gan.py"]
    problems = missing_paths([(REPO / "README.md", 7, text)])
    assert problems == ["README.md:7: names notes/README-inference.md, which does not exist"]


def test_the_module_map_lists_every_module_of_the_package():
    page = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "consissr").rglob("*.py")
                     if p.name != "__init__.py")
    unlisted = [m for m in modules if not re.search(rf"^{re.escape(m)}\s", page, re.M)]
    assert not unlisted, f"docs/architecture.md's module map lacks: {unlisted}"


def test_no_text_mentions_how_the_project_was_made():
    hits = [f"{path.relative_to(REPO)}:{number}: {text.strip()[:100]}" for path, number, text in documented_texts()
            if re.search(r"\bissues? \d+|\bthe issue\b", text, re.I)]
    assert not hits, "mentions of issues:\n" + "\n".join(hits)


def test_the_readme_is_short_and_starts_with_the_two_setup_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the detail belongs in docs/"
    assert lines[2:6] == [
        "```bash",
        "bash scripts/setup.sh && source .venv/bin/activate && dvc repro        # install, then build every stage on the "
        "embedded default",
        "bash scripts/setup.sh test && .venv/bin/python -m pytest               # install the test extras, then run the "
        "test suite",
        "```",
    ]
    pages = {m.group(1) for m in re.finditer(r"\]\((docs/[\w-]+\.md)\)", "\n".join(lines))}
    assert pages == {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md") if p.name != "index.md"}
