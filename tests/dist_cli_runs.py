"""A rank of several CLI runs in one launch (`conftest.run_cli_many`): each `::`-separated command in turn, in this
process; the first non-zero status ends the launch. The runs share one start-up (launcher, imports, process group),
which is most of a tiny run's time."""
from __future__ import annotations

import sys

from conftest import split_runs


def main(argv: list[str]) -> int:
    from rlhf_ds import cli

    for args in split_runs(argv):
        code = cli.main(args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if code == 0:  # as `rlhf_ds.cli.entry` does
        from rlhf_ds.engine.strategy import end_rank

        end_rank(code)
    sys.exit(code)
