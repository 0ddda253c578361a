"""DeepSeek-VL2: vision tower + projector + tile layout feeding the MLA/MoE language model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .language import LanguageModel
from .projector import Projector, layout_image
from .vision import VisionTower


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector)
        d = cfg.language.hidden_size
        self.image_newline = nn.Parameter(torch.empty(d))
        self.view_seperator = nn.Parameter(torch.empty(d))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language)

    def finish_loading(self) -> None:
        """After the weights are in place: the rotary table on their device, and the side-by-side
        projections stacked (fewer, larger matrix products)."""
        self.language.init_buffers()
        for module in self.modules():
            if hasattr(module, "fuse"):
                module.fuse()

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n_tiles, 3, 384, 384] on the model's device and dtype -> projected tiles [n_tiles, s*s, D]"""
        return self.projector(self.vision(pixels))

    def image_embeddings(self, pixels: torch.Tensor, crops: list[tuple[int, int]],
                         encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """pixels [n_tiles, 3, 384, 384] (per image: global then local tiles) -> [sum N_i, D]. ``encode``
        replaces ``encode_tiles`` (the engine passes its captured graphs)."""
        tiles = (encode or self.encode_tiles)(pixels.to(self.device, self.dtype))  # [n_tiles, s*s, D]
        out, first = [], 0
        for tw, th in crops:
            n = 1 + tw * th
            out.append(layout_image(tiles[first:first + n], tw, th, self.image_newline, self.view_seperator))
            first += n
        if first != tiles.shape[0]:
            raise ValueError(f"{tiles.shape[0]} tiles given but the crops {crops} account for {first}")
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixels: torch.Tensor | None,
              crops: list[tuple[int, int]],
              encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids [L] with image-token runs marked by image_mask [L] -> embeddings [L, D]."""
        ids = input_ids.to(self.device)
        x = self.language.model.embed_tokens(ids)
        n_slots = int(image_mask.sum())
        if not crops:
            if n_slots:
                raise ValueError(f"the prompt has {n_slots} image-token positions but no images")
            return x
        images = self.image_embeddings(pixels, crops, encode)
        if images.shape[0] != n_slots:
            raise ValueError(f"the images produce {images.shape[0]} embeddings but the prompt has {n_slots} slots")
        x[image_mask.to(self.device)] = images  # in order, as upstream's masked_scatter
        return x
