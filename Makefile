# The two commands of the README. Both install what they need first (idempotently).
.PHONY: setup run demo test lint vllm

setup:
	@scripts/setup.sh

# The service on its embedded default: API + one worker, SQLite and a file broker under .detox/.
run: setup
	.venv/bin/detox up

# One DINM edit of the demo model on the bundled example, no server: the before/after table.
demo: setup
	.venv/bin/detox dinm examples/safeedit_example.json --case example-1 --out out/example-1

# The whole test suite (starts PostgreSQL and Redis first when the suite needs them and they are down).
test: setup
	@scripts/test.sh

# vLLM in its own venv (.venv-vllm/; PyPI's CPU build here, VLLM_SPEC picks another): the engine
# that `detox up --engine vllm` starts and the vLLM tests run against.
vllm:
	@scripts/setup_vllm.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
