"""torchrun's entry point: `python -m stages.train --job JOB.json` (see stages.train.stage.main)."""

from stages.train.stage import main

main()
