"""`python -m workers`: one worker with the environment's settings (`DETOX_*`)."""

from workers.main import run_worker

raise SystemExit(run_worker())
