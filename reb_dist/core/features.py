"""Patch features: local 3x3 aggregation of stage 2 and 3, stage 3 upsampled to stage 2's grid.

Two aggregations, as the reference implementations do it:
- "avgpool" (anomalib): a 3x3 average pool (stride 1, pad 1) keeps every channel: C2 + C3 dims.
- "adaptive" (PatchCore / REB authors): unfold each 3x3 neighbourhood, adaptive-average-pool the
  flattened C*9 vector to `layer_dim` per stage, then pool the two stages together to `target_dim`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AGGREGATIONS = ("avgpool", "adaptive")


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def aggregate_avgpool(stages: list[torch.Tensor]) -> torch.Tensor:
    """Aggregate [stage2, stage3] maps to (B, C2+C3, H2, W2): each stage 3x3-averaged at its own
    resolution, then upsampled to stage 2's grid."""
    grid = stages[0].shape[-2:]
    pooled = [_upsample(F.avg_pool2d(s, 3, stride=1, padding=1), grid) for s in stages]
    return torch.cat(pooled, dim=1)


def aggregate_adaptive(stages: list[torch.Tensor], layer_dim: int, target_dim: int) -> torch.Tensor:
    """Aggregate [stage2, stage3] maps to (B, target_dim, H2, W2) as PatchCore builds it.

    Each stage's 3x3 neighbourhoods are unfolded and pooled to `layer_dim`, then the stages are
    pooled together to `target_dim`.
    """
    b, _, h, w = stages[0].shape
    per_stage = []
    for s in stages:
        c, sh, sw = s.shape[1], s.shape[2], s.shape[3]
        patches = F.unfold(s, kernel_size=3, padding=1)  # (B, C*9, sh*sw), channel-major
        patches = _upsample(patches.view(b, c * 9, sh, sw), (h, w))
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
        per_stage.append(F.adaptive_avg_pool1d(flat, layer_dim).squeeze(1))
    stacked = torch.stack(per_stage, dim=1).reshape(-1, 1, layer_dim * len(stages))
    out = F.adaptive_avg_pool1d(stacked, target_dim).squeeze(1)
    return out.view(b, h, w, target_dim).permute(0, 3, 1, 2)


class PatchFeatures(nn.Module):
    """Backbone + aggregation: images (B,3,S,S) -> patch features (B, D, h, w).

    Args:
        backbone: Module returning [stage2, stage3] feature maps (e.g. `Backbone.model`).
        aggregation: "avgpool" (D = C2 + C3) or "adaptive" (D = target_dim).
        layer_dim: Per-stage dimension of the "adaptive" aggregation.
        target_dim: Output dimension of the "adaptive" aggregation.

    Raises:
        ValueError: If `aggregation` is not in `AGGREGATIONS`.
    """

    def __init__(self, backbone: nn.Module, aggregation: str = "avgpool",
                 layer_dim: int = 1024, target_dim: int = 1024):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.backbone = backbone
        self.aggregation = aggregation
        self.layer_dim = layer_dim
        self.target_dim = target_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the (B, D, h, w) patch features of normalised images (B, 3, S, S)."""
        stages = self.backbone(images)
        if self.aggregation == "avgpool":
            return aggregate_avgpool(stages)
        return aggregate_adaptive(stages, self.layer_dim, self.target_dim)


def adaptive_pool_matrix(length: int, size: int) -> torch.Tensor:
    """(length, size) matrix M with x @ M == F.adaptive_avg_pool1d(x, size) for rows x of `length`.

    ONNX has no adaptive pooling to a size that does not divide the input; a fixed matrix of the
    same averages exports everywhere. Row j is the pooling of the j-th unit vector.
    """
    return F.adaptive_avg_pool1d(torch.eye(length).unsqueeze(1), size).squeeze(1)


class ExportableFeatures(nn.Module):
    """`PatchFeatures` with its "adaptive" aggregation's pooling done by fixed matrices (see
    `adaptive_pool_matrix`); "avgpool" is used as it is.

    Args:
        features: the detector's `PatchFeatures`.
        channels: (C2, C3) of its backbone's stages (`Backbone.channels`).
    """

    def __init__(self, features: nn.Module, channels: tuple[int, int]):
        super().__init__()
        self.backbone = features.backbone
        self.aggregation = features.aggregation
        if self.aggregation == "adaptive":
            layer_dim, target_dim = features.layer_dim, features.target_dim
            self.register_buffer("pool_stage2", adaptive_pool_matrix(channels[0] * 9, layer_dim))
            self.register_buffer("pool_stage3", adaptive_pool_matrix(channels[1] * 9, layer_dim))
            self.register_buffer("pool_stages", adaptive_pool_matrix(layer_dim * 2, target_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, D, h, w) patch features."""
        stages = self.backbone(images)
        if self.aggregation == "avgpool":
            return aggregate_avgpool(stages)
        h, w = stages[0].shape[-2:]
        per_stage = []
        for s, pool in zip(stages, (self.pool_stage2, self.pool_stage3)):
            # as aggregate_adaptive: unfold 3x3, upsample to stage 2's grid, pool each C*9 vector
            patches = F.unfold(s, kernel_size=3, padding=1)
            patches = patches.reshape(patches.shape[0], patches.shape[1], s.shape[2], s.shape[3])
            if patches.shape[-2:] != (h, w):
                patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)
            per_stage.append(patches.permute(0, 2, 3, 1) @ pool)  # (B, h, w, layer_dim)
        return (torch.cat(per_stage, -1) @ self.pool_stages).permute(0, 3, 1, 2)
