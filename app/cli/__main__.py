"""`python -m app.cli` is `detox`."""

from app.cli.main import main

main()
