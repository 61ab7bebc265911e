"""Run the ``tao`` CLI and SIGKILL the process right after its N-th optimizer step (counted in this process).

Usage: ``python kill_after_steps.py N tao-args...`` (``N <= 0``: never kill).  The hook is a global optimizer
step hook, so it fires for every network whatever its training loop; SIGKILL gives the run no chance to save
anything, like the OOM killer or a lost node.
"""
from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    limit = int(sys.argv[1])
    if limit > 0:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        taken = [0]

        def count(optimizer, args, kwargs) -> None:
            taken[0] += 1
            if taken[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_post_hook(count)
    from tao_cli.cli import main as tao_main

    sys.argv = ["tao", *sys.argv[2:]]
    tao_main()


if __name__ == "__main__":
    main()
