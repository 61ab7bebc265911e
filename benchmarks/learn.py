"""`make learn`: longer learning runs outside the test suite (curves and side-by-side comparisons).

Runs ``benchmarks.learn_<net>.main()`` for each network given on the command line (default: all that exist).
Each writes its JSON (and PNG where there is a curve) to ``benchmarks/results/``.
"""
from __future__ import annotations

import importlib
import sys

LEARNERS = ["learn_mal", "learn_mask2former", "learn_mask_grounding_dino"]


def main() -> None:
    for name in sys.argv[1:] or LEARNERS:
        module = f"benchmarks.{name if name.startswith('learn_') else 'learn_' + name}"
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            print(f"skipping {module}: {exc}")
            continue
        print(f"== {module}", flush=True)
        mod.main()


if __name__ == "__main__":
    main()
