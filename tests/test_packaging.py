"""Packaging: the tasks/ folder is fusionzoo.tasks, the CLI explains itself, the README runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_tasks_folder_installs_under_fusionzoo_namespace(tmp_path: Path) -> None:
    # Run from an unrelated folder so the repository root is not on sys.path.
    code = (
        "import importlib.util, fusionzoo.tasks as t;"
        "print(importlib.util.find_spec('tasks') is None, t.__name__, sorted(t.TASKS.list()))"
    )
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True", "a top-level 'tasks' module must not be installed"
    assert "fusionzoo.tasks" in result.stdout


def test_users_own_tasks_module_is_not_shadowed(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text("MINE = True\n")
    result = _run([sys.executable, "-c", "import fusionzoo, tasks; print(tasks.MINE)"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"]])
def test_cli_help_explains_itself(argv: list[str], tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "fusionzoo", *argv], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: fusionzoo" in result.stdout
    assert len(result.stdout.splitlines()) > 5


def test_cli_list_shows_the_six_fusions(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "fusionzoo", "list"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ["early_concat", "late_voting", "attention_weighted", "co_attention",
                 "merged_transformer", "albef", "efficientnet-lite0", "minilm-l6", "vqa"]:
        assert re.search(rf"^\s+{re.escape(name)}\s", result.stdout, re.M), name


def test_cli_bad_plugin_is_a_clear_error(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "fusionzoo", "--import", "no_such_mod_xyz", "list"], cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot import plugin module 'no_such_mod_xyz'" in result.stderr


def _readme_section_code(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    assert blocks, f"README section '{title}' has no python example"
    return "\n".join(blocks)


def test_readme_add_your_own_fusion_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_readme_section_code("Add your own fusion"))
    result = _run([sys.executable, str(script)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
