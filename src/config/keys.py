"""Markers a family puts in its constructor's annotations, `Annotated[<type>, <marker>]`, so that validation
checks its keys without importing it (see `family.py`). Light on purpose: validation imports this module."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPath:
    """A file or folder the family reads. A set path must exist; a `required` one must be set unless model.tiny=true
    (the family then uses its tiny model). `what` completes "It should be ..." / "Point it at ...". With `repo_id`,
    a Hugging Face repo id (owner/name, no such path) is accepted too: the family downloads it when online."""

    what: str
    example: str = ""
    required: bool = False
    repo_id: bool = False


@dataclass(frozen=True)
class Choices:
    """Words for the error of a `Literal` key: `what` the key sets, and `listed`, the choices explained, in place of
    the bare list ("true (...), offload (...) or false")."""

    what: str = ""
    listed: str = ""
