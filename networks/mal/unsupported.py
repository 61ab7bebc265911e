"""Spec fields this network accepts but does not act on, each with the reason (the ``Network`` contract's
``unsupported`` and ``tao_ignored`` tables; ``docs/compat.md`` lists them).

* ``UNSUPPORTED``: TAO acts on the field, tao-cli does not.  A non-default value is a one-line ``ConfigError``
  at spec load (``--dry-run`` too).  A key may name a whole section.
* ``TAO_IGNORED``: TAO itself ignores the field (or, as the reason says, its non-default value is what tao-cli
  does anyway); a non-default value logs one warning naming it.

Every other field of the schema is read by the code: ``tests/tao_cli/test_field_walk.py`` fails when a field is
neither read nor listed here, or when a listed field is read (a stale entry).
"""

from __future__ import annotations

UNSUPPORTED: dict[str, str] = {
}

TAO_IGNORED: dict[str, str] = {
    "evaluate.comp_clustering": "TAO never computes the clustering score it names (val/cluster_score is never updated)",
    "model_name": "informational; the network is the one named on the command line",
    "train.optim_momentum": "stored but unused: the optimizer is AdamW",
}
