"""Run the real ``tao`` entry point in-process and return its exit code."""
from __future__ import annotations

import sys


def tao_exit_code(*argv: str) -> int:
    """``tao *argv`` through ``tao_cli.cli.main``; the exit code (0 when it returns normally)."""
    from tao_cli.cli import main

    old = sys.argv
    sys.argv = ["tao", *argv]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code or 0
    finally:
        sys.argv = old
