"""SIGINT/SIGTERM during a run: every way a run can be interrupted ends as :class:`Interrupted` (exit 130).

SIGTERM during ``fit`` only sets a flag: Lightning then stops at the next batch boundary and the checkpoint
callback saves first.  Anywhere else both signals raise ``KeyboardInterrupt`` at once.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "SignalState", "handle_signals", "fit_mode_callback", "interruptible"]


class Interrupted(Exception):
    """The run was interrupted by a signal; the message says which and where the checkpoint went."""


class SignalState:
    """What one run has received: ``received`` is the first signal's name; ``in_fit`` marks Lightning's fit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.in_fit = False

    def handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        self.received = self.received or name
        if signum == signal.SIGTERM and self.in_fit:
            return
        raise KeyboardInterrupt(name)


@contextmanager
def handle_signals(state: SignalState) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``state`` for the duration (main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, state.handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def fit_mode_callback(state: SignalState):
    """A Lightning callback that marks the span of ``fit`` in which Lightning's own SIGTERM handling is active."""
    from pytorch_lightning import Callback

    class _FitMode(Callback):
        def on_fit_start(self, trainer, pl_module):
            state.in_fit = True

        def on_fit_end(self, trainer, pl_module):
            state.in_fit = False

        def on_exception(self, trainer, pl_module, exception):
            state.in_fit = False

    return _FitMode()


def interruptible(trainer, state: SignalState, what: str, call: Callable[[], Any], ckpt_cb=None) -> Any:
    """Run ``call`` (a Trainer fit/test/predict); turn Lightning's ways of ending on a signal into ``Interrupted``.

    Lightning ends on KeyboardInterrupt with ``sys.exit(1)`` and on SIGTERM with ``SIGTERMException`` (a
    ``SystemExit``), after calling the callbacks' ``on_exception`` (where the checkpoint is saved).
    """
    from pytorch_lightning.trainer.states import TrainerStatus
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    interrupted = False
    result = None
    try:
        result = call()
    except (KeyboardInterrupt, SystemExit) as exc:
        if not (state.received or isinstance(exc, (KeyboardInterrupt, SIGTERMException))
                or trainer.state.status == TrainerStatus.INTERRUPTED):
            raise
        interrupted = True
    if interrupted or trainer.state.status == TrainerStatus.INTERRUPTED:
        where = ""
        if ckpt_cb is not None and trainer.is_global_zero:
            saved = ckpt_cb.interrupt_path
            where = f"; checkpoint saved: {saved}" if saved else "; no checkpoint saved"
        raise Interrupted(f"{what} interrupted by {state.received or 'SIGINT'}{where}")
    return result
