"""romac: compile QLoRA LLaMA checkpoints onto ROM-based LLM accelerators (ROMA)."""

__version__ = "0.1.0"
