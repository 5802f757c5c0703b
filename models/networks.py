"""The three networks of a bundle: the Stage I DPM, the Stage II noisy segmenter, the Stage IV filter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from monai.networks.nets import UNet as MonaiUNet
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from models.labels import mask_channels


class Condition(IntEnum):
    """The DPM's class embedding: what to synthesise (y1), and whether the mask condition is present."""

    MASK = 0  # y1 = 0: synthesise a mask; the mask channel is zeros
    IMAGE_GIVEN_MASK = 1  # y1 = 1: synthesise an image for the mask in the second channel
    IMAGE_UNCOND = 2  # y1 = 1 with the mask dropped (classifier-free), mask channel zeros


DEFAULT_DPM_CHANNELS = (32, 64, 96, 128)


def embed_image(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Images ``[B, 1, H, W]`` as the DPM's ``[B, C, H, W]`` signal: the image in channel 0, zeros after.

    One network denoises K-channel masks and one-channel images; an image's extra channels are a
    constant zero that it learns to restore (and that sampling drops: ``image_part``).
    """
    if channels == 1:
        return images
    return torch.cat([images, images.new_zeros(images.shape[0], channels - 1, *images.shape[2:])], dim=1)


def image_part(x: torch.Tensor) -> torch.Tensor:
    """The image of a DPM signal ``[B, C, H, W]``: channel 0."""
    return x[:, :1]


def build_dpm(
    resolution: int,
    block_out_channels: tuple[int, ...] = DEFAULT_DPM_CHANNELS,
    layers_per_block: int = 1,
    attention: bool = True,
    channels: int = 1,
) -> UNet2DModel:
    """The Stage I ε-prediction UNet: input ``[x_t, mask-or-zeros]``, 3 class embeddings (Condition).

    ``channels`` is the encoded mask's (``models.labels.mask_channels``): 1 for binary masks, K for K
    classes; x_t and the mask condition each have that many. The defaults (3.7M parameters) train at
    about 1 step/s at 64x64 on two CPU cores and keep sampling under one second per pair there;
    attention sits at the coarsest level only.
    """
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    if resolution % (2 ** (n - 1)):
        raise ValueError(f"resolution {resolution} must be divisible by {2 ** (n - 1)} for {n} UNet levels")
    return UNet2DModel(
        sample_size=resolution,
        in_channels=2 * channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=layers_per_block,
        num_class_embeds=len(Condition),
        norm_num_groups=min(8, block_out_channels[0]),
        attention_head_dim=32,
    )


@dataclass
class SegmenterOutput:
    mask_logits: torch.Tensor  # [B, C, H, W]: f_ψ's per-pixel logits for y2 (C = 1 binary, K classes)
    y1_logit: torch.Tensor  # [B]: g_ω's logit of "x_t is an image" (y1 = 1)


class NoisySegmenter(ModelMixin, ConfigMixin):
    """Stage II: f_ψ(x_t, t), a small time-conditioned UNet, and the head g_ω for y1 (Eq. 2).

    f_ψ outputs the mask logits (one channel for a binary mask, K softmax logits for K classes) plus
    ``head_features`` feature channels; g_ω pools those features and classifies image vs mask. It must stay far cheaper than the DPM, since guidance
    costs one forward and one input-backward per solver step: it runs at ``1/downsample`` of the
    resolution (area-pooled in, bilinear out; see ``default_segmenter_downsample``).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        layers_per_block: int = 1,
        head_features: int = 8,
        downsample: int = 1,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        n = len(block_out_channels)
        self.channels = mask_channels(num_classes)
        if downsample < 1 or sample_size % downsample:
            raise ValueError(
                f"downsample {downsample} must be a positive divisor of sample_size {sample_size}"
            )
        self.downsample = downsample
        self.unet = UNet2DModel(
            sample_size=sample_size // downsample,
            in_channels=self.channels,
            out_channels=self.channels + head_features,
            block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            layers_per_block=layers_per_block,
            norm_num_groups=min(8, block_out_channels[0]),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * head_features, 32),
            nn.SiLU(),
            nn.Linear(32, 1),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SegmenterOutput:
        h = F.avg_pool2d(x_t, self.downsample) if self.downsample > 1 else x_t
        out = self.unet(h, t).sample
        if self.downsample > 1:
            out = F.interpolate(out, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
        feats = out[:, self.channels :]
        pooled = torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))], dim=1)
        return SegmenterOutput(mask_logits=out[:, : self.channels], y1_logit=self.head(pooled).squeeze(1))


def default_segmenter_downsample(resolution: int) -> int:
    """Run the noisy segmenter at about 16x16 whatever the data resolution.

    At 64x64 this keeps guided sampling within ~10 % of unguided on the CPU (32x32 cost ~20 %);
    guidance acts on noisy inputs, where the lung-scale shape matters and fine detail does not.
    """
    factor = 1
    while resolution // (factor * 2) >= 16 and resolution % (factor * 2) == 0:
        factor *= 2
    return factor


class FilterSegmenter(nn.Module):
    """Stage IV: a MONAI UNet on clean images, trained separately from the noisy segmenter.

    The Stage II network sees t = 0 in about 1/1000 of its training, so a dedicated clean
    segmenter scores synthetic pairs far more reliably (its held-out Dice is in bundle.json).
    """

    def __init__(
        self, channels: tuple[int, ...] = (16, 32, 64, 128), num_res_units: int = 2, num_classes: int = 2
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"channels": list(channels), "num_res_units": num_res_units}
        if num_classes != 2:  # written only for K > 2, so binary filters keep their config.json
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.net = MonaiUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=mask_channels(num_classes),
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, C, H, W]`` for images in [-1, 1] (C = 1 binary, K softmax logits for K classes)."""
        out: torch.Tensor = self.net(image)
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors")
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FilterSegmenter:
        folder = Path(folder)
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        model = cls(
            channels=tuple(config["channels"]),
            num_res_units=int(config["num_res_units"]),
            num_classes=int(config.get("num_classes", 2)),
        )
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
