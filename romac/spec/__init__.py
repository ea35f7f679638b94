"""The facts, and nothing else: number formats (``formats``), the tile/word and SRAM layout (``layout``), the
instruction set (``isa``, and its text form ``asm``), the compile plan's records (``plan``) and the artifact
directory's manifest schema (``manifest``). Everything else in romac asks here; this package imports nothing of
romac but its error types (``romac.errors``)."""
