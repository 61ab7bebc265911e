"""End-to-end runs through the real ``tao`` entry point (in-process), on generated synthetic data."""
from __future__ import annotations

import sys

import pytest


@pytest.fixture()
def tao(monkeypatch, capfd):
    """``tao(*argv) -> (exit_code, stdout, stderr)`` running ``tao_cli.cli.main`` in-process."""
    from tao_cli.cli import main

    def run(*argv: str):
        monkeypatch.setattr(sys, "argv", ["tao", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        out, err = capfd.readouterr()
        return int(exc.value.code or 0), out, err

    return run
