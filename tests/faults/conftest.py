"""Fault injection for the data and evaluation tools (issue 23): every test in this folder is marked `faults`
(run by the plain `pytest` command too; `pytest -m faults` runs only them). Mechanisms: faults/helpers.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended (a killed run's temporaries carry such a pid)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


