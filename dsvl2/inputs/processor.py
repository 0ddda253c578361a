"""DeepSeek-VL2 preprocessing: one user turn (text + images) -> token ids, image tiles, image mask.

Tiling follows the reference: each image gives a global 384x384 view plus a grid of 384x384 local
tiles cut from the image padded into the best candidate resolution; three or more images are not
tiled. Each `<image>` tag in the prompt becomes that image's run of image-token ids.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from dsvl2.errors import CheckpointError, InputError
from dsvl2.inputs.images import check_size, to_rgb

TILE = 384  # SigLIP-SO400M/14 input size: every view and crop is TILE x TILE
PATCH = 14  # vision patch size: 384 // 14 = 27 patches per side (the last 6 pixels are dropped)
DOWNSAMPLE = 2  # the projector merges 2x2 patches, padding 27 -> 28 first
MAX_TILED_IMAGES = 2  # with more images than this in a request the reference does not tile
USER_PREFIX = "<|User|>: "  # sft_format "deepseek", one user turn, no system prompt
ASSISTANT_SUFFIX = "\n\n<|Assistant|>:"


def image_token_count(tiles_across: int, tiles_down: int) -> int:
    """Image tokens for one image: global rows + newlines, view separator, local rows + newlines."""
    side = math.ceil((TILE // PATCH) / DOWNSAMPLE)  # 14 tokens per tile side
    global_view = side * (side + 1)  # each of the 14 rows ends with `image_newline`
    local_view = tiles_down * side * (tiles_across * side + 1)  # stitched grid rows + newlines
    return global_view + 1 + local_view  # + 1 for `view_seperator`


def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (w, h) keeping the most of a (W, H) image's pixels, then wasting the fewest.

    Ties after both go to the earlier candidate. The float arithmetic mirrors the reference so the
    same candidate wins at the boundaries.
    """
    width, height = size
    best, best_effective, best_waste = candidates[0], -1, math.inf
    for w, h in candidates:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


@dataclass
class Encoded:
    """One encoded request. L = prompt length, T = total tiles over all images."""

    input_ids: torch.Tensor  # [L] long
    pixel_values: torch.Tensor  # [T, 3, 384, 384] float32, normalised; per image global then local
    spatial_crops: list[tuple[int, int]]  # per image (tiles_across, tiles_down)
    num_image_tokens: list[int]  # per image, the length of its image-token run
    image_mask: torch.Tensor  # [L] bool, True where input_ids is the image token


@dataclass(frozen=True)
class ProcessorConfig:
    """The supported subset of `processor_config.json`."""

    candidate_resolutions: tuple[tuple[int, int], ...]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_token: str
    pad_token: str

    @classmethod
    def from_dict(cls, raw: dict) -> ProcessorConfig:
        def field(name: str):
            if name not in raw:
                raise CheckpointError(f"processor_config.json: missing field {name!r}")
            return raw[name]

        def refuse(name: str, why: str) -> CheckpointError:
            return CheckpointError(f"processor_config.json: unsupported {name}={raw.get(name)!r}: {why}")

        if field("patch_size") != PATCH:
            raise refuse("patch_size", f"the vision tower uses {PATCH}")
        if field("downsample_ratio") != DOWNSAMPLE:
            raise refuse("downsample_ratio", f"the projector merges {DOWNSAMPLE}x{DOWNSAMPLE} patches")
        if raw.get("image_size", TILE) != TILE:
            raise refuse("image_size", f"the vision tower takes {TILE}x{TILE} tiles")
        if raw.get("normalize", True) is not True:
            raise refuse("normalize", "only normalised pixels are supported")
        if raw.get("sft_format", "deepseek") != "deepseek":
            raise refuse("sft_format", "only the 'deepseek' chat format is supported")
        resolutions = field("candidate_resolutions")
        if not resolutions or any(len(r) != 2 or min(r) < TILE or r[0] % TILE or r[1] % TILE for r in resolutions):
            raise refuse("candidate_resolutions", f"need a non-empty list of [w, h] multiples of {TILE}")
        mean, std = field("image_mean"), field("image_std")
        if len(mean) != 3:
            raise refuse("image_mean", "need 3 values (RGB)")
        if len(std) != 3 or min(std) <= 0:
            raise refuse("image_std", "need 3 positive values (RGB)")
        return cls(
            candidate_resolutions=tuple((int(w), int(h)) for w, h in resolutions),
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
            image_token=field("image_token"),
            pad_token=field("pad_token"),
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint is missing {path.name} ({path})") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _token_name(value: str | dict | None) -> str | None:
    """A token name as written in special_tokens_map.json: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Processor:
    """Builds model inputs for one user turn; see `encode`."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig, bos_token: str, eos_token: str):
        self.tokenizer = tokenizer
        self.config = config
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        self.pad_id = self._token_id(config.pad_token)
        self.image_token_id = self._token_id(config.image_token)
        # Background of the padded views: the mean colour, so it normalises to ~0 (127 for 0.5).
        self._background = tuple(int(m * 255) for m in config.image_mean)
        mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1)
        # Every uint8 value's normalised float32 per channel [3, 256], computed with the reference's operations
        # (x/255, then (x - mean)/std, each rounded in float32): normalising a view is a table lookup with the
        # same values, written straight into the tile tensor.
        self._lut = torch.arange(256, dtype=torch.float32).div(255).sub(mean).div(std).numpy()
        self._helper: ThreadPoolExecutor | None = None  # makes each image's global view (see _tiles)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer.json has no token {token!r}")
        return token_id

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike) -> Processor:
        """Read tokenizer.json, processor_config.json and the bos/eos names from a checkpoint."""
        root = Path(checkpoint_dir)
        config = ProcessorConfig.from_dict(_read_json(root / "processor_config.json"))
        names: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins where both say
            if (root / name).is_file():
                names.update(_read_json(root / name))
        bos, eos = _token_name(names.get("bos_token")), _token_name(names.get("eos_token"))
        if not bos or not eos:
            raise CheckpointError(f"neither special_tokens_map.json nor tokenizer_config.json in {root} names bos/eos")
        if not (root / "tokenizer.json").is_file():
            raise CheckpointError(f"checkpoint is missing tokenizer.json ({root})")
        try:
            tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception for a bad file
            raise CheckpointError(f"cannot parse {root / 'tokenizer.json'}: {e}") from e
        return cls(tokenizer, config, bos, eos)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a tokenizer whose token ids reach past the model's embedding table (``vocab_size`` rows): such an
        id would fail every request that produced it, so the checkpoint is refused when it is loaded."""
        largest = max(self.tokenizer.get_vocab(with_added_tokens=True).values())
        if largest >= vocab_size:
            raise CheckpointError(f"tokenizer.json has token ids up to {largest}, but config.json's "
                                  f"language_config.vocab_size is {vocab_size}: ids from {vocab_size} on have no "
                                  f"embedding (the tokenizer and the weights do not belong together)")

    def encode(self, prompt: str, images: list[Image.Image]) -> Encoded:
        """Token ids, tiles and image mask for one user turn; one `<image>` tag per image.

        A prompt without tags gets "<image>\\n" prepended once per image (as the reference demos do).
        """
        text = prompt.strip()
        if not text:
            raise InputError("the prompt is empty")
        tag = self.config.image_token
        n_tags = text.count(tag)
        if n_tags == 0:
            text = f"{tag}\n" * len(images) + text
        elif n_tags != len(images):
            raise InputError(
                f"the prompt has {n_tags} {tag} tag{'' if n_tags == 1 else 's'} but {len(images)} "
                f"image{' was' if len(images) == 1 else 's were'} given; use one tag per image, or no tags to put "
                "every image before the text"
            )

        tiled = len(images) <= MAX_TILED_IMAGES
        tiles, crops, counts = [], [], []
        for image in images:
            grid, pixels = self._tiles(image, tiled)
            tiles.append(pixels)
            crops.append(grid)
            counts.append(image_token_count(*grid))

        pieces = (USER_PREFIX + text + ASSISTANT_SUFFIX).split(tag)
        ids = [self.bos_id]
        for i, piece in enumerate(pieces):
            if i > 0:
                ids += [self.image_token_id] * counts[i - 1]
            ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        input_ids = torch.tensor(ids, dtype=torch.long)
        if not tiles:
            pixel_values = torch.zeros(0, 3, TILE, TILE)
        else:
            pixel_values = tiles[0] if len(tiles) == 1 else torch.cat(tiles)  # one image: no copy
        return Encoded(input_ids, pixel_values, crops, counts, input_ids == self.image_token_id)

    def _tiles(self, image: Image.Image, tiled: bool) -> tuple[tuple[int, int], torch.Tensor]:
        """((tiles_across, tiles_down), [1 + across*down, 3, 384, 384]) for one image."""
        check_size(*image.size)  # catches images that did not come through load_image
        if image.mode != "RGB":
            image = to_rgb(image)
        if tiled:
            width, height = select_best_resolution(image.size, self.config.candidate_resolutions)
        else:
            width, height = TILE, TILE
        across, down = width // TILE, height // TILE
        out = torch.empty(1 + down * across, 3, TILE, TILE)
        # The global view on a helper thread while this one makes the local view (Pillow's resampling releases
        # the interpreter lock): the same operations on the same pixels, side by side.
        image.load()  # decoded once here, not by both threads at once
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="dsvl2-global-view")
        global_view = self._helper.submit(lambda: self._normalise(self._pad(image, (TILE, TILE)), out[:1]))
        # The local view [down*384, across*384] cut into row-major 384x384 crops.
        self._normalise(self._pad(image, (width, height)), out[1:])
        global_view.result()
        return (across, down), out

    def _normalise(self, image: Image.Image, out: torch.Tensor) -> None:
        """An RGB view of (a*384) x (d*384) pixels -> out [d*a, 3, 384, 384] float32, crops row-major: x/255 then
        (x - mean)/std per channel, in float32 like the reference transform (see ``_lut``)."""
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        dest = out.numpy()
        down, across = pixels.shape[0] // TILE, pixels.shape[1] // TILE
        for i in range(down):
            for j in range(across):
                crop = pixels[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE]
                for c in range(3):
                    np.take(self._lut[c], crop[..., c], out=dest[i * across + j, c])

    def _pad(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        # Aspect-preserving bicubic resize (upscaling too), centred on the mean colour.
        return ImageOps.pad(image, size, method=Image.Resampling.BICUBIC, color=self._background)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens (e.g. `<|ref|>`, `<|det|>`) kept, bos/eos/pad dropped."""
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
