"""The IR: a LLaMA-family decoder as a small graph of ops over lazily loaded weights (``model``), and what each op
computes (``ops``: the reference semantics the golden model, the ONNX self-check and calibration run)."""

from romac.ir.model import *  # noqa: F401,F403
from romac.ir.model import __all__  # noqa: F401
