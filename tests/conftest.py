"""Test-wide setup: offline Hugging Face, and ``tests/`` importable for test-only packages (boring_net).

``tests/`` goes at the *end* of ``sys.path``: it holds a ``networks`` test package that must never shadow the
real ``networks`` library.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(TESTS_DIR) not in sys.path:
    sys.path.append(str(TESTS_DIR))


@pytest.fixture()
def one_thread():
    """One intra-op thread for the test: on a shared 2-core machine small ops run several times faster."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
