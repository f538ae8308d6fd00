"""A small CNN written the usual way: BatchNorm, `F.relu` and `flatten` in `forward`, a bias-free conv.

    autopar run --plan-first examples/glue_cnn.py:model --cluster cpu --global-batch 16 --nproc-per-node 2 \
        --sync-batchnorm --steps 5

The pipeline stages autopar cuts from it keep the glue in `forward` (the relu and the flatten run on the stage that
owns them), and `--sync-batchnorm` makes the BatchNorm statistics those of the whole batch under data parallelism.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two conv / BatchNorm blocks and a linear classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4)
        return self.fc(torch.flatten(x, 1))


def model() -> SmallCNN:
    """The factory autopar calls (on the meta device to plan, on each rank to train)."""
    return SmallCNN()


def example_batch(batch_size: int):
    """Images and class labels."""
    return torch.randn(batch_size, 3, 16, 16), torch.randint(0, 10, (batch_size,))


def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes."""
    return F.cross_entropy(output, targets)
