"""One rank of a hand-launched gloo job (the caller sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

``python worker.py CONFIG KILL_RANK KILL_AT_STEP``: trains CONFIG; rank KILL_RANK SIGKILLs itself
after step KILL_AT_STEP, as a crashed GPU process would. Exit code and stderr are the CLI's.
"""

from __future__ import annotations

import os
import signal
import sys

from streamtune.config import load
from streamtune.errors import StreamtuneError
from streamtune.train.recipe import Recipe


class KillingRecipe(Recipe):
    kill_rank = -1
    kill_step = -1

    def on_step_end(self, step: int) -> None:
        if self.dist.rank == self.kill_rank and step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    config, kill_rank, kill_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    KillingRecipe.kill_rank, KillingRecipe.kill_step = kill_rank, kill_step
    recipe = KillingRecipe(load(config, []))
    try:
        recipe.setup()
        recipe.loop()
    except StreamtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        recipe.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
