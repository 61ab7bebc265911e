"""Shared fixtures for networks.common tests: one small synthetic dataset per session, an isolated cache."""
from __future__ import annotations

import pytest

from networks.common.synthetic import generate


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The synthetic dataset (defaults but fewer images) generated once for the session."""
    return generate(tmp_path_factory.mktemp("synth"), seed=3, num_train=12, num_val=10)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Point TAO_CACHE_DIR at a fresh directory; returns the archives cache root."""
    monkeypatch.setenv("TAO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "archives"
