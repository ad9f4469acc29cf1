"""Markers a family puts in its constructor's annotations, `Annotated[<type>, <marker>]`, so that validation
checks its keys without importing it (see `family.py`). Light on purpose: validation imports this module."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPath:
    """A file or folder the family reads. A set path must exist; a `required` one must be set unless model.tiny=true
    (the family then uses its tiny model). `what` completes "It should be ..." / "Point it at ..."."""

    what: str
    example: str = ""
    required: bool = False


@dataclass(frozen=True)
class Choices:
    """Words for the error of a `Literal` key: `what` the key sets, and `listed`, the choices explained, in place of
    the bare list ("true (...), offload (...) or false")."""

    what: str = ""
    listed: str = ""


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: from `low` (excluded when `above`) to `high`; `note` explains a special value."""

    low: float
    high: float = float("inf")
    above: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.high != float("inf"):
            return f"between {self.low:g} and {self.high:g}"
        return f"{'>' if self.above else '>='} {self.low:g}"
