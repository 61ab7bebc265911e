"""``tao weights inspect`` must name the network and format of every layout the weight-format tests build."""
from __future__ import annotations

from pathlib import Path


def assert_inspect_names(path: str | Path, network: str, fmt: str) -> None:
    """Run the ``tao weights inspect`` logic on ``path`` (no ``--network``: every registered network's formats
    are tried, as a user's first call does) and require exit 0 with ``network`` and ``fmt`` named."""
    from tao_cli.weights_cmd import inspect_text

    text, code = inspect_text(path)
    assert code == 0, text
    assert f"network:     {network}\n" in text and f"format:      {fmt}\n" in text, text
