"""The self-supervised classifier REB fine-tunes: ImageNet backbone + global average pool + MLP head.

Pure torch, no Ray: the Ray Train loop wraps it. After training only the backbone is kept; its state
dict uses the backbone's own key names, so `build_backbone(name, weights=file)` loads it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from reb_dist.core.backbones import Backbone


def trunk_forward(name: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C) pooled last-stage features of a registry backbone (the whole trunk, not just stage 3)."""
    if name.startswith("efficientnet"):
        x = net.forward_features(x)  # timm: blocks + conv_head + bn2
    elif name.startswith("vgg"):
        x = net.features(x)
    else:  # torchvision ResNets
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


# update: BatchNorm statistics re-estimated on the SSL images (the authors' training, PyTorch's default);
# frozen: kept from the start weights. See docs/RESULTS.md, "Which layers fine-tuning moves".
BN_STATS = ("update", "frozen")


class SSLClassifier(nn.Module):
    """Backbone -> GAP -> MLP (512, 256; BN, ReLU) -> class logits, as the REB authors build it.

    Args:
        backbone: Registry backbone; its full network is trained, its ImageNet classifier replaced.
        num_classes: Number of SSL classes.
        hidden: Widths of the head's hidden layers.
        bn_stats: "update" or "frozen" (see `BN_STATS` and `train`).

    Raises:
        ValueError: If `bn_stats` is not in `BN_STATS`.
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden: tuple[int, ...] = (512, 256),
                 bn_stats: str = "update"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.bn_stats = bn_stats
        self.name = backbone.name
        self.net = backbone.model.net  # the full network behind the stage taps
        # The ImageNet classifier is replaced by our head; left in place, DDP would wait for its
        # gradients forever. Its keys are then absent from the saved backbone, which is fine.
        for attr in ("classifier", "fc"):
            if hasattr(self.net, attr):
                setattr(self.net, attr, nn.Identity())
        with torch.no_grad():
            dim = trunk_forward(self.name, self.net.eval(), torch.zeros(1, 3, 64, 64)).shape[1]
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            dim = width
        self.head = nn.Sequential(*layers, nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (B, num_classes) logits for images `x` (B, 3, H, W)."""
        return self.head(trunk_forward(self.name, self.net, x))

    def train(self, mode: bool = True) -> SSLClassifier:
        """Set training mode as `nn.Module.train` does, and return self.

        bn_stats="frozen" keeps the backbone's BatchNorm layers in eval mode, so their running
        statistics stay those of the start weights (their affine parameters still learn).
        """
        super().train(mode)
        if mode and self.bn_stats == "frozen":
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the backbone's weights under its own key names (what `backbone.weights=` loads), on CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
