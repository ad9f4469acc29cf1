"""OmniGen2's diffusion transformer, text-to-image path.

The architecture is Lumina 2's NextDiT (refiners, then joint blocks of grouped-query attention with q/k RMSNorm,
SwiGLU and tanh-gated modulation) with OmniGen2's own additions: a reference-image patch embedder, refiner and
per-image index embedding (edit / in-context inputs), rotary positions that continue after the caption, timestep
scaling and the Qwen2.5-VL hidden states as text features. Its blocks are diffusers' Lumina 2 blocks, whose
module names are OmniGen2's checkpoint keys; the model around them is ours.

Conventions as upstream's: the timestep runs from noise (0) to image (1), scaled by `timestep_scale` before the
sinusoidal embedding, and the output is the velocity image minus noise. Text tokens sit at rotary positions
(i, i, i); the image's tokens at (caption length, row, column). Only text-to-image inputs are taken here: the
reference-image modules exist so that checkpoints load, and take no part in the forward pass."""
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import LuminaLayerNormContinuous, RMSNorm
from diffusers.models.transformers.transformer_lumina2 import Lumina2TransformerBlock
from torch import nn

MAX_REFERENCE_IMAGES = 5  # rows of image_index_embedding
FREQUENCY_CHANNELS = 256  # sinusoidal timestep features
ROPE_THETA = 10000.0


class TimestepCaptionEmbedding(nn.Module):
    """The timestep embedding (scaled sinusoid, then an MLP) and the caption projection (RMSNorm, Linear)."""

    def __init__(self, hidden_size: int, text_feat_dim: int, norm_eps: float, timestep_scale: float):
        super().__init__()
        self.time_proj = Timesteps(FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                                   scale=timestep_scale)
        self.timestep_embedder = TimestepEmbedding(FREQUENCY_CHANNELS, min(hidden_size, 1024))
        self.caption_embedder = nn.Sequential(RMSNorm(text_feat_dim, eps=norm_eps),
                                              nn.Linear(text_feat_dim, hidden_size, bias=True))

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype)), self.caption_embedder(text)


def rotary_frequencies(positions: torch.Tensor, axes_dim: Sequence[int]) -> torch.Tensor:
    """[B, L, 3] integer positions -> [B, L, head_dim / 2] complex rotations, one band of frequencies per axis
    (computed in float64, as the model's precomputed tables are)."""
    bands = []
    for axis, dim in enumerate(axes_dim):
        inverse = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles = positions[..., axis, None].to(torch.float64) * inverse
        bands.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(bands, dim=-1)


def caption_then_image_positions(text_mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, L + rows * cols, 3]: caption token i at (i, i, i) (padding at 0), then the image grid at
    (caption length, row, column), the caption length being each sample's own."""
    batch, length = text_mask.shape
    device = text_mask.device
    text = torch.arange(length, device=device).expand(batch, length) * text_mask
    grid_rows, grid_cols = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                                          indexing="ij")
    image = torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_cols], dim=-1).flatten(0, 1)
    image = image.expand(batch, -1, -1).clone()
    image[..., 0] = text_mask.sum(dim=1, keepdim=True)
    return torch.cat([text[..., None].expand(-1, -1, 3), image], dim=1)


class OmniGen2Transformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    _no_split_modules = ["Lumina2TransformerBlock"]

    @register_to_config
    def __init__(self, patch_size: int = 2, in_channels: int = 16, out_channels: Optional[int] = None,
                 hidden_size: int = 2520, num_layers: int = 32, num_refiner_layers: int = 2,
                 num_attention_heads: int = 21, num_kv_heads: int = 7, multiple_of: int = 256,
                 ffn_dim_multiplier: Optional[float] = None, norm_eps: float = 1e-5,
                 axes_dim_rope: Sequence[int] = (40, 40, 40), axes_lens: Sequence[int] = (10000, 10000, 10000),
                 text_feat_dim: int = 2048, timestep_scale: float = 1000.0):
        super().__init__()
        if hidden_size // num_attention_heads != sum(axes_dim_rope):
            raise ValueError(f"hidden_size / num_attention_heads ({hidden_size // num_attention_heads}) must equal "
                             f"sum(axes_dim_rope) ({sum(axes_dim_rope)})")
        patch_features = patch_size * patch_size * in_channels
        self.out_channels = out_channels or in_channels

        def blocks(count: int, modulation: bool = True) -> nn.ModuleList:
            return nn.ModuleList(Lumina2TransformerBlock(hidden_size, num_attention_heads, num_kv_heads, multiple_of,
                                                         ffn_dim_multiplier, norm_eps, modulation=modulation)
                                 for _ in range(count))

        self.x_embedder = nn.Linear(patch_features, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_features, hidden_size)
        self.time_caption_embed = TimestepCaptionEmbedding(hidden_size, text_feat_dim, norm_eps, timestep_scale)
        self.noise_refiner = blocks(num_refiner_layers)
        self.ref_image_refiner = blocks(num_refiner_layers)
        self.context_refiner = blocks(num_refiner_layers, modulation=False)
        self.layers = blocks(num_layers)
        self.norm_out = LuminaLayerNormContinuous(hidden_size, min(hidden_size, 1024), elementwise_affine=False,
                                                  eps=1e-6, bias=True,
                                                  out_dim=patch_size * patch_size * self.out_channels)
        self.image_index_embedding = nn.Parameter(torch.zeros(MAX_REFERENCE_IMAGES, hidden_size))

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H/p * W/p, p * p * C] (row-major patches, each patch's pixels then channels)."""
        p = self.config.patch_size
        b, c, h, w = latents.shape
        patches = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.out_channels
        b = tokens.shape[0]
        patches = tokens.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return patches.reshape(b, c, height, width)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text_hidden_states: torch.Tensor,
                text_attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, C, H, W] latents, timestep [B] (0 noise .. 1 image), text_hidden_states [B, L, D]
        with text_attention_mask [B, L] (True at real tokens) -> the velocity [B, C, H, W]."""
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        text_mask = text_attention_mask.bool()
        temb, text = self.time_caption_embed(timestep, text_hidden_states, hidden_states.dtype)
        image = self.x_embedder(self.patchify(hidden_states))
        rotations = rotary_frequencies(caption_then_image_positions(text_mask, height // p, width // p),
                                       self.config.axes_dim_rope)
        # padding caption tokens carry no rotation while the caption is refined alone (masked from then on)
        text_rotations = rotations[:, :text.shape[1]] * text_mask[..., None]
        image_rotations = rotations[:, text.shape[1]:]
        image_mask = text_mask.new_ones(image.shape[:2])

        for block in self.context_refiner:
            text = block(text, text_mask, text_rotations)
        for block in self.noise_refiner:
            image = block(image, image_mask, image_rotations, temb)
        joint = torch.cat([text, image], dim=1)
        joint_mask = torch.cat([text_mask, image_mask], dim=1)
        for block in self.layers:
            joint = block(joint, joint_mask, rotations, temb)
        return self.unpatchify(self.norm_out(joint[:, text.shape[1]:], temb), height, width)
