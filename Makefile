# The two commands of the README. Both install what they need first (idempotently).
.PHONY: setup run test lint

setup:
	@scripts/setup.sh

# The main job on the embedded default: a DINM edit of the demo model on the bundled example.
run: setup
	.venv/bin/detox dinm examples/safeedit_example.json --case example-1 --out out/example-1

# The whole test suite (starts PostgreSQL and Redis first when the suite needs them and they are down).
test: setup
	@scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
