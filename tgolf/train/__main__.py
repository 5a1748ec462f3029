"""``torchrun --nproc_per_node=8 -m tgolf.train`` (or ``python -m tgolf.train``): the whole contest run.

Without DATA_PATH it runs the `smoke` preset on the embedded default corpus, end to end on a CPU.
"""
from __future__ import annotations

import argparse
import sys

from tgolf.config import CONTEST_ENV_VARS, add_config_arguments, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tgolf.train",
        description="Train, quantize, compress, size-check and score a Parameter Golf model in one run. "
                    "Every flag can also be set by its upper-cased environment variable (the contest's "
                    f"{', '.join(CONTEST_ENV_VARS[:10])}, ...); flags win over the environment.")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tgolf.export import BudgetExceeded
    from tgolf.train.loop import NonFiniteLoss, Preempted
    from tgolf.train.run import run

    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as err:
        print(f"tgolf.train: {err}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except NonFiniteLoss as err:
        print(f"tgolf.train: stopped: {err}", file=sys.stderr)
        return 3
    except BudgetExceeded as err:
        print(f"tgolf.train: {err}", file=sys.stderr)
        return 4
    except Preempted as err:
        print(f"tgolf.train: {err}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
