"""The generic engine: results dir, devices, Trainer, checkpoints, status, logs, encryption.

Entry point: :func:`tao_cli.engine.run.run_action` (imported lazily so ``tao --help`` stays fast).
"""

__all__ = ["run_action"]


def run_action(*args, **kwargs):
    """Lazy alias of :func:`tao_cli.engine.run.run_action`."""
    from .run import run_action as _run_action

    return _run_action(*args, **kwargs)
