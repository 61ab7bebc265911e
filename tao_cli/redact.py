"""Keeping the encryption key out of everything a run writes or prints: one place for the rules.

The key is replaced by ``*****`` where it is a named field (the spec, ``key=value`` words) and, when it is at
least 4 characters long, anywhere in free text (logs, status.json, error lines).  Shorter keys are masked only
as named fields: replacing every ``"a"`` in a log would destroy the log without protecting anything.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["REDACTED", "SECRET_FIELDS", "secrets_of", "mask", "redact_argv", "redact_container"]

REDACTED = "*****"
#: Spec fields whose values are secrets (top-level names or full dotted keys).
SECRET_FIELDS = ("encryption_key",)


def secrets_of(key: str | None) -> tuple[str, ...]:
    """The strings masked in free text for encryption key ``key``."""
    return (key,) if key and len(key) >= 4 else ()


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``*****``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_argv(argv: Sequence[str], key: str | None) -> list[str]:
    """Command-line words with secret fields' values (``encryption_key=...``) and the key itself masked."""
    out = []
    for token in argv:
        name, eq, _ = str(token).partition("=")
        if eq and name.lstrip("+~").split(".")[-1] in SECRET_FIELDS:
            out.append(f"{name}={REDACTED}")
        else:
            out.append(mask(str(token), secrets_of(key)))
    return out


def redact_container(data: Any, fields: Sequence[str] = SECRET_FIELDS, prefix: str = "") -> Any:
    """A copy of a plain spec container (dicts/lists) with secret fields that have a value replaced."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if (k in fields or dotted in fields) and v not in (None, "") and not isinstance(v, (dict, list)):
                out[k] = REDACTED
            else:
                out[k] = redact_container(v, fields, dotted)
        return out
    if isinstance(data, list):
        return [redact_container(v, fields, prefix) for v in data]
    return data
