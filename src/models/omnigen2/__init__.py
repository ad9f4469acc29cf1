"""OmniGen2 (VectorSpaceLab), which diffusers does not ship: its transformer, written from the published
architecture with module names equal to the original checkpoint's keys."""
from .transformer import OmniGen2Transformer2DModel

__all__ = ["OmniGen2Transformer2DModel"]
