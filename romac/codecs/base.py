"""What every codec is: a quantized tensor, and the interface that makes one from floats and back."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from romac.spec.formats import WeightFormat

#: elements per vectorised step: temporaries stay near L2 size, far below 64 MB
CHUNK = 1 << 17


@dataclass(frozen=True, eq=False)
class QuantTensor:
    """A quantized tensor: one unsigned code per element plus per-group and per-tensor parameters."""

    format: str
    shape: tuple[int, ...]
    codes: np.ndarray
    params: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)


class Codec(abc.ABC):
    """The arithmetic of one number format (its facts: ``self.format``, a :class:`romac.spec.formats.WeightFormat`)."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.format = fmt

    @property
    def name(self) -> str:
        return self.format.name

    @abc.abstractmethod
    def quantize(self, w: np.ndarray) -> QuantTensor:
        """Codes and parameters of a float tensor."""

    @abc.abstractmethod
    def dequantize(self, q: QuantTensor) -> np.ndarray:
        """The float32 values the codes stand for."""

    def spec(self) -> dict:
        return self.format.spec()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.format == other.format

    def __hash__(self) -> int:
        return hash(self.format)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"
