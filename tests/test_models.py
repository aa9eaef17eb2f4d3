"""The embedding network: timm trunk by name, local weights file, unit-norm embeddings of the configured size."""

from __future__ import annotations

import timm
import torch

from study.models import EmbeddingNet


def test_embeddings_are_unit_norm_with_configured_size():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 24).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_pretrained_from_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "trunk.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different random init, which the file must overwrite
    loaded = EmbeddingNet("test_resnet", 8, pretrained=path)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.trunk.state_dict()[name], tensor, msg=name)
    fresh = EmbeddingNet("test_resnet", 8)
    assert not torch.equal(fresh.trunk.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
