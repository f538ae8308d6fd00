"""ResNet-18/34/50/101/152 in plain torch (torchvision's v1.5 layout: stride on the 3x3 conv), laid out for autopar.

Top-level pipeline units: `stem` (7x7 conv, BN, ReLU, max-pool), each residual block in `blocks` (one flat
ModuleList over all four stages), and `head` (average pool, flatten, fully connected). Each takes one tensor and
returns one. Parameter counts equal torchvision's exactly (ResNet-50: 25,557,032) without importing torchvision.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from profiler.zoo.layers import InitByName

_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNetConfig(BaseModel):
    """Size of a ResNet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: Literal[18, 34, 50, 101, 152] = Field(default=50, description="18 / 34 (basic blocks) or 50 / 101 / 152.")
    num_classes: int = Field(default=1000, ge=2, description="Output classes.")
    image_size: int = Field(default=224, ge=32, description="Input images are image_size x image_size RGB.")
    width: int = Field(default=64, ge=1, description="Channels of the first stage (torchvision: 64).")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes))


class Stem(nn.Module):
    """7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max-pool."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class ClassifierHead(nn.Module):
    """Global average pool and the fully connected classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet(InitByName):
    """stem -> blocks -> head; returns class logits of shape (batch, num_classes)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        block_cls = BasicBlock if cfg.depth < 50 else Bottleneck
        self.stem = Stem(cfg.width)
        blocks: list[nn.Module] = []
        inplanes = cfg.width
        for stage, count in enumerate(_STAGES[cfg.depth]):
            planes = cfg.width * 2**stage
            for i in range(count):
                blocks.append(block_cls(inplanes, planes, stride=2 if stage > 0 and i == 0 else 1))
                inplanes = planes * block_cls.expansion
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(inplanes, cfg.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole parameter or buffer by its name (torchvision's scheme): Kaiming-normal convolutions (fan
        out), BN scale 1 / shift 0 / running stats (0, 1), the classifier uniform(+-1/sqrt(fan_in)). The executor
        calls this per tensor with a name-seeded generator."""
        module = self.get_submodule(name.rpartition(".")[0])
        attr = name.rpartition(".")[2]
        if isinstance(module, nn.Conv2d):
            fan_out = tensor.shape[0] * tensor[0][0].numel()
            nn.init.normal_(tensor, 0.0, math.sqrt(2.0 / fan_out), generator=generator)
        elif isinstance(module, nn.BatchNorm2d) and attr in ("weight", "running_var"):
            nn.init.ones_(tensor)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.zeros_(tensor)
        else:
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(tensor, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def image_batch(cfg: ResNetConfig, batch_size: int, gen: torch.Generator | None, device: str):
    """Random images and class labels."""
    x = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen, device=device)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen, device=device)
    return (x,), y
