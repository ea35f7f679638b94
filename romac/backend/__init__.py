"""The back-end: the ISA (romac.backend.isa) and the emitter that writes the artifact directory."""
