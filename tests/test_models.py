"""The embedding network: timm trunk by name, local weights file, unit-norm embeddings of the configured size."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d converts to

from study.models import EmbeddingNet


def test_embeddings_are_unit_norm_with_configured_size():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 24).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_backbone_options_reach_timm():
    """The quickstart's narrower resnet10t: the options change the trunk (its feature width and size)."""
    narrow = EmbeddingNet("resnet10t", 16, backbone_options={"channels": [32, 64, 128, 256], "stem_width": 16})
    full = EmbeddingNet("resnet10t", 16)
    assert narrow.trunk.num_features == 256 and full.trunk.num_features == 512
    assert narrow.trunk.conv1[0].out_channels == 12 and full.trunk.conv1[0].out_channels == 24
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 16)


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


@pytest.mark.parametrize("backbone", ["resnet50", "inception_v3", "deit_small_patch16_224"])
def test_paper_backbones_give_unit_embeddings_at_224_px(backbone):
    torch.manual_seed(0)
    model = EmbeddingNet(backbone, 16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize(
    ("pooling", "reduce"),
    [
        ("avg", lambda f: f.mean(dim=(2, 3))),
        ("max", lambda f: f.amax(dim=(2, 3))),
        ("avgmax", lambda f: 0.5 * (f.mean(dim=(2, 3)) + f.amax(dim=(2, 3)))),
    ],
)
def test_cnn_pooling_is_applied_to_the_feature_map(pooling, reduce):
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8, pooling=pooling).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feature_map = model.trunk.forward_features(images)
        assert feature_map.shape[-1] > 1  # so that avg, max and avgmax differ
        torch.testing.assert_close(model.features(images), reduce(feature_map))


def test_a_pooling_the_backbone_cannot_do_is_a_one_line_error():
    with pytest.raises(
        ValueError, match=r"^backbone 'test_resnet' cannot pool with 'token'; it allows: avg, max, avgmax$"
    ):
        EmbeddingNet("test_resnet", 8, pooling="token")
    with pytest.raises(
        ValueError, match=r"^backbone 'test_vit2' cannot pool with 'token'; it allows: avg, max, avgmax$"
    ):
        EmbeddingNet("test_vit2", 8, pooling="token")  # a ViT without a class token
    with pytest.raises(ValueError, match="pooling 'catavgmax' is not one of avg, max, avgmax, token"):
        EmbeddingNet("test_resnet", 8, pooling="catavgmax")


@pytest.mark.parametrize(
    ("backbone", "norm", "pooled", "poolings"),  # where the checkpoint has its final norm, what it was trained with
    [("test_vit", "norm", "token", ("token", "avg", "max")), ("test_vit2", "fc_norm", "avg", ("avgmax", "max"))],
)
def test_vit_pooling_keeps_the_pretrained_final_norm(backbone, norm, pooled, poolings, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(backbone, num_classes=0)
    assert source.global_pool == pooled
    with torch.no_grad():
        getattr(source, norm).weight.uniform_(0.5, 1.5)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    for pooling in poolings:
        model = EmbeddingNet(backbone, 8, pretrained=path, pooling=pooling)
        torch.testing.assert_close(getattr(model.trunk, norm).weight, getattr(source, norm).weight, msg=pooling)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # max over the patch tokens (class token left out), then fc_norm where the model has one
        tokens = model.trunk.forward_features(images)[:, model.trunk.num_prefix_tokens :]
        torch.testing.assert_close(model.features(images), model.trunk.fc_norm(tokens.amax(dim=1)))


def _train_step(model: EmbeddingNet, images: torch.Tensor) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    model.train()
    model(images).sum().backward()  # any loss that reaches every parameter
    optimizer.step()


def test_freeze_bn_keeps_statistics_and_affine_parameters_while_convolutions_train():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8, freeze_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    frozen = [m for m in model.trunk.modules() if isinstance(m, FrozenBatchNorm2d)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    conv = model.trunk.conv1[0].weight.clone()
    _train_step(model, torch.randn(4, 3, 32, 32) * 3 + 1)  # batch statistics far from the running ones
    assert len(frozen) > 5
    for module, state in zip(frozen, before, strict=True):
        assert set(state) == {"weight", "bias", "running_mean", "running_var"}
        for name, tensor in state.items():
            assert torch.equal(module.state_dict()[name], tensor), name
    assert not torch.equal(model.trunk.conv1[0].weight, conv)


@pytest.mark.parametrize(("backbone", "size"), [("test_resnet", 32), ("inception_v3", 96)])
def test_frozen_bn_in_train_mode_computes_what_the_pretrained_trunk_computes_in_eval_mode(backbone, size, tmp_path):
    torch.manual_seed(0)
    source = EmbeddingNet(backbone, 8)
    for m in source.modules():  # non-trivial statistics, so that a lost eps or running_var would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.001, 2.0)
    torch.save(source.trunk.state_dict(), tmp_path / "trunk.pth")
    frozen = EmbeddingNet(backbone, 8, pretrained=tmp_path / "trunk.pth", freeze_bn=True)
    frozen.head.load_state_dict(source.head.state_dict())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(images), source.eval()(images))


def test_unfrozen_bn_does_update_statistics():  # the control for the test above
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8)
    before = model.trunk.bn1.running_mean.clone()
    _train_step(model, torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(model.trunk.bn1.running_mean, before)


def test_frozen_trunk_trains_only_the_head():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8, freeze_bn=True)
    model.set_trunk_trainable(False)
    trunk, head = [p.clone() for p in model.trunk.parameters()], model.head.weight.clone()
    _train_step(model, torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(model.trunk.parameters(), trunk, strict=True))
    assert not torch.equal(model.head.weight, head)
    model.set_trunk_trainable(True)
    assert all(p.requires_grad for p in model.trunk.parameters())


def test_forward_is_head_of_cached_features():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.features(images)
        assert features.shape == (3, model.trunk.num_features)
        torch.testing.assert_close(model(images), model.embed_features(features))


def test_channels_last_gives_the_same_embeddings():
    torch.manual_seed(0)
    model = EmbeddingNet("test_resnet", 8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        out = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
