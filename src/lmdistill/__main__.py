"""`python -m lmdistill` runs the CLI (launchers such as torchrun take this form)."""

from lmdistill.cli import main

main()
