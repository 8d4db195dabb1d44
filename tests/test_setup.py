"""`make setup` stops at the failing step and stamps the environment only when the console script runs.

The venv here is a fake: its `python` hands everything to the test's interpreter except what the test
makes fail, so the Makefile's own recipe runs end to end in a second without installing anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def fake_venv(root: Path, fail_pip: bool, with_rpt: bool) -> Path:
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    pip_branch = 'echo "ERROR: simulated install failure" >&2; exit 1' if fail_pip else "exit 0"
    py = venv / "bin" / "python"
    py.write_text(
        f'#!/bin/bash\nif [ "$1 $2" = "-m pip" ]; then {pip_branch}; fi\nexec {sys.executable} "$@"\n'
    )
    py.chmod(0o755)
    if with_rpt:
        rpt = venv / "bin" / "rpt"
        rpt.write_text(f'#!/bin/bash\nexec {sys.executable} -m app.cli "$@"\n')
        rpt.chmod(0o755)
    return venv


def make_setup(venv: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        ["make", "-s", "setup", f"VENV={venv}", f"PY={sys.executable}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stamps(venv: Path) -> list[Path]:
    return list(venv.glob(".installed-*"))


def test_failed_install_stops_setup_without_a_stamp(tmp_path):
    venv = fake_venv(tmp_path, fail_pip=True, with_rpt=True)
    r = make_setup(venv)
    assert r.returncode != 0
    assert "simulated install failure" in r.stdout + r.stderr
    assert "setup ok" not in r.stdout
    assert stamps(venv) == []


def test_missing_console_script_fails_setup(tmp_path):
    venv = fake_venv(tmp_path, fail_pip=False, with_rpt=False)
    r = make_setup(venv)
    assert r.returncode != 0, r.stdout + r.stderr
    assert stamps(venv) == []


def test_working_install_is_stamped(tmp_path):
    venv = fake_venv(tmp_path, fail_pip=False, with_rpt=True)
    r = make_setup(venv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "setup ok" in r.stdout
    assert len(stamps(venv)) == 1
