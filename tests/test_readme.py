"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.startswith("pip install") and main_job.endswith("squeeze quickstart")
    assert "pytest" in tests and '".[dev]"' in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and 'eval "$test_command"' in ci
    assert '"$rc" -eq 5' in ci  # "no tests collected" is a failure
