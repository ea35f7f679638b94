"""``python -m romac.cli``."""

from romac.cli import main

main()
