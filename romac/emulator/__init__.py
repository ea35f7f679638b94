"""The functional emulator: runs an artifact directory, and nothing else, to show what the chip computes."""

from romac.emulator.machine import Machine

__all__ = ["Machine"]
