"""The 2x2-downsample MLP projector (``projector.layers.{0,2}``) and the 2D tile layout.

Each image becomes: the global view as rows of (tile vectors + ``image_newline``), one
``view_seperator`` (spelled that way in the checkpoint), then the local tiles stitched into one
(th*14) x (tw*14) grid with an ``image_newline`` after every row:
N = 211 + 14*th*(14*tw + 1) vectors for the real sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.ratio = cfg.downsample_ratio
        in_dim = cfg.input_dim * self.ratio * self.ratio
        # Index 1 is the GELU of the upstream nn.Sequential; it holds no weights.
        self.layers = nn.ModuleList(
            [nn.Linear(in_dim, cfg.n_embed), nn.Identity(), nn.Linear(cfg.n_embed, cfg.n_embed)])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, g*g, C] vision features -> [N, s*s, D] with s = ceil(g / 2)"""
        n, t, c = feats.shape
        g = int(t**0.5)
        x = feats.transpose(1, 2).reshape(n, c, g, g)  # [N, C, g, g]
        pad = (-g) % self.ratio
        x = F.pad(x, (0, pad, 0, pad))  # zero row at the bottom, zero column at the right
        # unfold gathers each 2x2 block channel-major: index = c*4 + dy*2 + dx, as upstream.
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio).transpose(1, 2)  # [N, s*s, 4C]
        x = F.gelu(self.layers[0](x))  # exact (erf) GELU
        return self.layers[2](x)


def layout_image(
    tiles: torch.Tensor, tiles_across: int, tiles_down: int, newline: torch.Tensor, separator: torch.Tensor
) -> torch.Tensor:
    """Arrange one image's projected tiles into its token sequence.

    tiles [1 + tw*th, s*s, D] (global first, then local tiles row-major) -> [N, D].
    """
    n, ss, d = tiles.shape
    s = int(ss**0.5)
    tw, th = tiles_across, tiles_down
    assert n == 1 + tw * th, f"expected {1 + tw * th} tiles for a {tw}x{th} grid, got {n}"
    glob = tiles[0].view(s, s, d)
    glob = torch.cat([glob, newline.expand(s, 1, d)], dim=1).reshape(-1, d)  # [s*(s+1), D]
    local = tiles[1:].view(th, tw, s, s, d).permute(0, 2, 1, 3, 4).reshape(th * s, tw * s, d)
    local = torch.cat([local, newline.expand(th * s, 1, d)], dim=1).reshape(-1, d)  # [th*s*(tw*s+1), D]
    return torch.cat([glob, separator.view(1, d), local], dim=0)
