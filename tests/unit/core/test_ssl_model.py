"""The self-supervised classifier REB fine-tunes (pure torch)."""

import torch
from reb_dist.core.backbones import build_backbone


def test_frozen_bn_stats_keep_the_start_statistics_while_weights_learn():
    """bn_stats=frozen: a training step moves the weights, not the backbone's running statistics."""
    from reb_dist.core.ssl_model import SSLClassifier

    backbone = build_backbone("efficientnet_lite0")
    images, labels = torch.randn(8, 3, 64, 64), torch.arange(8) % 7
    for bn_stats, stats_move in (("update", True), ("frozen", False)):
        model = SSLClassifier(build_backbone("efficientnet_lite0"), 7, bn_stats=bn_stats).train()
        for p in model.parameters():  # as the training loop does: build_backbone returns it frozen
            p.requires_grad_(True)
        before = {k: v.clone() for k, v in model.net.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        after = model.net.state_dict()
        moved = lambda key: not torch.equal(before[key], after[key])
        assert moved("blocks.2.0.conv_pw.weight")  # the backbone learns either way
        assert moved("blocks.2.0.bn1.running_mean") == stats_move, bn_stats
        assert moved("blocks.2.0.bn1.running_var") == stats_move, bn_stats
        assert model.head[1].training  # the head's own BatchNorm always trains
    assert backbone.fingerprint == build_backbone("efficientnet_lite0").fingerprint
