"""``tao dataset validate``: run the per-format checks of ``networks.common.dataset_checks`` and report.

Output contract: a Rich summary table (file, format, record counts, errors, warnings), then one line per problem
(``severity where: message``) for the first ``max_lines`` problems, then the count of each kind (rule) for all
of them.  ``--json OUT`` writes the whole report atomically.  Exit code 2 when any problem is an error, else 0.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from networks.common.dataset_checks import DEFAULT_SAMPLE, Problem, check_file
from networks.common.io import atomic_write_json

__all__ = ["validate", "report_dict"]


def report_dict(path: str | os.PathLike, fmt: str, problems: list[Problem], stats: dict) -> dict:
    """The JSON report: file, format, stats, error/warning counts, counts per rule, and every problem."""
    return {
        "file": str(path),
        "format": fmt,
        "stats": stats,
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
        "counts": dict(Counter(f"{p.severity}:{p.rule}" for p in problems).most_common()),
        "problems": [p.as_dict() for p in problems],
    }


def validate(path: str | os.PathLike, *, fmt: str | None = None, images: str | os.PathLike | None = None,
             masks: str | os.PathLike | None = None, label_map: str | os.PathLike | None = None,
             all_images: bool = False, json_out: str | os.PathLike | None = None, max_lines: int = 50,
             console: Console | None = None) -> int:
    """Validate ``path``, print the report to ``console`` and return the exit code (2 on any error, else 0).

    A bad argument (missing file, unknown format) raises DataError (the CLI prints it as one line, exit 2)."""
    out = console or Console()
    fmt, problems, stats = check_file(path, fmt, images=images, masks=masks, label_map=label_map,
                                      all_images=all_images, sample=DEFAULT_SAMPLE)
    report = report_dict(path, fmt, problems, stats)
    table = Table(title="tao dataset validate", show_header=False)
    table.add_column("item")
    table.add_column("value")
    table.add_row("file", escape(str(path)))
    table.add_row("format", fmt)
    for key, value in stats.items():
        table.add_row(key, str(value))
    table.add_row("errors", str(report["errors"]))
    table.add_row("warnings", str(report["warnings"]))
    out.print(table)
    for p in problems[:max_lines]:
        out.print(f"{p.severity} {escape(p.where)}: {escape(p.message)} [{p.rule}]", highlight=False, soft_wrap=True)
    if len(problems) > max_lines:
        out.print(f"... {len(problems) - max_lines} more problem(s)", highlight=False)
    if problems:
        out.print("counts per kind:", highlight=False)
        for kind, n in report["counts"].items():
            out.print(f"  {kind}: {n}", highlight=False)
    if json_out is not None:
        atomic_write_json(Path(os.path.expanduser(str(json_out))), report, indent=1)
        out.print(f"report written to {escape(str(json_out))}", highlight=False)
    out.print("result: " + ("FAIL" if report["errors"] else "OK"), highlight=False)
    return 2 if report["errors"] else 0
