"""`python -m snapc` runs the CLI."""

from snapc.cli import main

main()
