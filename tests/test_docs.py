"""The README and docs/ tell the truth about the repository, and the code's prose stays short.

The README is a front door of at most 150 lines with the quick start on its first screen; every
relative link (and #anchor) resolves; every `make X` names a Makefile target; every `sweep.py`
command in a code block composes against the real conf/ and passes the schema's checks, and
every `analyze.py` command parses with its real options. A module docstring is at most 15
lines, and no comment or docstring in pnn/ or tests/ tells history (that is git log's).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import shlex
import tokenize
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, open_dict

from pnn.config import ConfigError, register_schema, schema, validate

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
QUICK_START = ("make demo", "make test", "make sweep", "make ui")
SHELL_OPERATORS = {"&&", "||", ";", "|"}
MODULE_DOCSTRING_LINES = 15
HISTORY = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\bseen in CI\b",
        r"\bused to (fail|be|crash|print|skip|hang|leave|add)\b",
        r"\bissues? #?\d+\b",
        r"(?<![\w/])#\d{2,}\b",
        r"\bcommit [0-9a-f]{7,40}\b",
        r"\bthe old (code|rule|version)\b",
    )
]


def python_files(*roots: str) -> list[Path]:
    """The tracked-looking .py files under ``roots`` (folders or single files of the repo)."""
    files: list[Path] = []
    for root in roots:
        path = REPO / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts and "__pycache__" not in f.parts]


def module_docstring_lines(source: str) -> int:
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def prose(source: str) -> Iterator[tuple[int, str]]:
    """Each comment (without its ``#``) and each docstring line of ``source``, with its line."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string.lstrip("#").strip()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                if isinstance(doc.value.value, str):
                    for i, line in enumerate(doc.value.value.splitlines()):
                        yield doc.lineno + i, line


def history_in(source: str) -> list[tuple[int, str]]:
    return [(n, text) for n, text in prose(source) if any(p.search(text) for p in HISTORY)]


def split_markdown(text: str) -> tuple[str, list[str]]:
    """The prose (fenced blocks blanked out) and the fenced blocks' contents."""
    prose, blocks, block, fence = [], [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, block = stripped[:3], []
            prose.append("")
        elif fence is not None and stripped.startswith(fence):
            blocks.append("\n".join(block))
            fence = None
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, "a code fence is never closed"
    return "\n".join(prose), blocks


def inline_code(prose: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_markdown(page.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def commands(block: str) -> Iterator[list[str]]:
    """Each shell command of a code block, as words (comments, continuations, && split off)."""
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in SHELL_OPERATORS:
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def program_args(command: list[str], script: str) -> list[str] | None:
    """The arguments of `python <script> ...` (any python: `.venv/bin/python` too), else None."""
    for i, word in enumerate(command[:-1]):
        if Path(word).name.startswith("python") and command[i + 1] == script:
            return command[i + 2 :]
    return None


def fenced_commands(script: str) -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for block in split_markdown(page.read_text())[1]:
            for command in commands(block):
                args = program_args(command, script)
                if args is not None:
                    found.append((f"{page.relative_to(REPO)}: {' '.join(command)}", args))
    return found


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def make_targets_named() -> list[tuple[str, str]]:
    """(page, target) for every `make ...` in a code block or an inline code span."""
    found = []
    for page in PAGES:
        prose, blocks = split_markdown(page.read_text())
        for code in [*blocks, *inline_code(prose)]:
            for command in commands(code):
                if command[0] != "make":
                    continue
                for word in command[1:]:
                    if "=" not in word and not word.startswith("-"):
                        found.append((str(page.relative_to(REPO)), word))
    return found


def test_readme_is_one_screen_with_the_quick_start_first() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    first = "\n".join(lines[:60])
    missing = [c for c in QUICK_START if c not in first]
    assert not missing, f"not in README.md's first 60 lines: {missing}"


def test_relative_links_resolve() -> None:
    broken, checked = [], 0
    for page in PAGES:
        prose, _ = split_markdown(page.read_text())
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked >= 10, "the link scan found almost no links"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_make_targets_exist() -> None:
    named = make_targets_named()
    assert {t for _, t in named} >= {"demo", "test", "sweep", "ui", "lint"}
    targets = makefile_targets()
    unknown = [f"{page}: make {t}" for page, t in named if t not in targets]
    assert not unknown, f"not Makefile targets: {unknown}"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def override_variants(args: list[str]) -> list[list[str]]:
    """Plain override lists covering every value of every sweep: each swept value once, the
    other sweeps at their first value (compose() takes no sweeps)."""
    parsed = OverridesParser.create().parse_overrides(args)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        value = override.value()
        if isinstance(value, Glob):
            values = value.filter(group_options(override.key_or_group))
            if not values:
                raise ValueError(f"{override.input_line}: no file in conf/{override.key_or_group}")
        else:
            values = list(override.sweep_string_iterator())
        choices.append([f"{key}={v}" for v in values])
    first = [c[0] for c in choices]
    variants = [first]
    for i, values in enumerate(choices):
        variants += [[*first[:i], v, *first[i + 1 :]] for v in values[1:]]
    return variants


def without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_sweep_commands_compose(hydra_conf: None) -> None:
    found = fenced_commands("sweep.py")
    assert len(found) >= 15, f"found only {len(found)} sweep.py commands in code blocks"
    wrong = []
    for where, args in found:
        args = [a for a in args if a not in ("--help", "-m", "--multirun")]
        try:
            if any("<" in a for a in args):
                raise ValueError("a placeholder in a code block: write a real value")
            for overrides in override_variants(args):
                validate(without_hydra(compose("config", overrides, return_hydra_config=True)))
        except Exception as err:  # any failure here is a mistake in the docs
            wrong.append(f"{where}\n  {type(err).__name__}: {err}")
    assert not wrong, "commands that do not compose:\n" + "\n".join(wrong)


def schema_has(key: str) -> bool:
    if key == "none":
        return True
    node = schema()
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def load_analyze() -> ModuleType:
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "analyze.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analyze_commands_parse() -> None:
    analyze = load_analyze()
    found = fenced_commands("analyze.py")
    assert len(found) >= 5, f"found only {len(found)} analyze.py commands in code blocks"
    wrong = []
    for where, args in found:
        if "--help" in args or "-h" in args:
            continue
        # `--run <run id>`: a placeholder stands for one value.
        args = re.sub(r"<[^>]*>", "PLACEHOLDER", " ".join(shlex.quote(a) for a in args))
        try:
            parsed = analyze.parse_args(shlex.split(args))
        except SystemExit:
            wrong.append(f"{where}: analyze.py refuses these options")
            continue
        by = [k for keys in parsed.by or [] for k in keys.split(",")]
        wrong += [f"{where}: --by {k} is no config key" for k in by if not schema_has(k)]
    assert not wrong, "\n".join(wrong)


def test_checks_catch_mistakes(hydra_conf: None) -> None:
    """The checks above can fail: a wrong key or group, a target and an anchor are each caught."""
    refused = (ConfigError, ConfigCompositionException, MissingConfigException)
    for bad in (["model.nfilter=128"], ["model=resnet19"], ["hydra.launcher.gpu=[0]"]):
        with pytest.raises(refused):
            validate(without_hydra(compose("config", overrides=bad, return_hydra_config=True)))
    assert [w for c in commands("make PYTHON=python3.11 demo # x") for w in c] == [
        "make",
        "PYTHON=python3.11",
        "demo",
    ]
    assert "nonesuch" not in makefile_targets() and "demo" in makefile_targets()
    assert (
        slug("Who trains a job: the lease in the store")
        == "who-trains-a-job-the-lease-in-the-store"
    )
    assert slug("The README's `claims`") == "the-readmes-claims"
    assert not schema_has("train.epoch") and schema_has("train.epochs")


def test_module_docstrings_are_short() -> None:
    long = []
    for path in python_files("pnn", "tests", "sweep.py", "analyze.py"):
        lines = module_docstring_lines(path.read_text())
        if lines > MODULE_DOCSTRING_LINES:
            long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not long, f"module docstrings over {MODULE_DOCSTRING_LINES} lines:\n" + "\n".join(long)


def test_no_history_in_the_code_prose() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {text}"
        for path in python_files("pnn", "tests")
        for line, text in history_in(path.read_text())
    ]
    assert not found, "history belongs in git log, figures in bench/RESULTS.md:\n" + "\n".join(
        found
    )


def test_the_prose_checks_can_fail() -> None:
    """A long module docstring and history in a comment or a docstring are each caught."""
    long = '"""' + "a line\n" * MODULE_DOCSTRING_LINES + '"""\n'
    assert module_docstring_lines(long) == MODULE_DOCSTRING_LINES + 1
    source = (
        '"""Short."""\n'
        "x = '#123 in a string is code, not prose'  # as seen in CI\n"
        "def f():\n"
        '    """It used to fail (#4567; issue 16)."""\n'
    )
    assert module_docstring_lines(source) == 1
    assert [n for n, _ in history_in(source)] == [2, 4]
    assert not history_in('"""Job #1 of 3, a step of 0.3 s."""\n# noqa: E501\n')
