"""Every supported weight layout, written here in its own key layout, loads with strict=True through the one loader
and computes the same function as its source."""
import argparse

import pytest
import timm
import torch

from core.checkpoint import load_pretrained_weights
from core.dino import DINOHead, MultiCropWrapper
from core.errors import UserError
from core.features import build_backbone
from core.vision_transformer import VisionTransformer, vit_tiny

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return vit_tiny(16, img_size=32).eval()


def loads_same(path, source, x=X, **kw):
    model, _ = build_backbone(path, **kw)
    assert model.state_dict().keys() == source.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=0)
    return model


def with_head(backbone):
    return MultiCropWrapper(backbone, DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)).state_dict()


def test_official_dino_full_checkpoint(tmp_path, source):
    """DDP student (module.backbone.), teacher (backbone.), heads, args as an argparse.Namespace."""
    torch.save({"student": {f"module.{k}": v for k, v in with_head(source).items()}, "teacher": with_head(source),
                "optimizer": {}, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
                "dino_loss": {"center": torch.zeros(1, 64)}}, tmp_path / "dino.pth")
    for key in ("teacher", "student"):
        loads_same(tmp_path / "dino.pth", source, checkpoint_key=key)


def test_our_checkpoint_reads_arch_from_stored_args(tmp_path, source):
    torch.save({"teacher": with_head(source), "args": {"arch": "vit_tiny", "patch_size": 16,
                                                       "global_crops_size": 32}}, tmp_path / "ours.pth")
    model = loads_same(tmp_path / "ours.pth", source)
    assert model.patch_embed.grid_size == (2, 2)


def test_backbone_only_and_safetensors(tmp_path, source):
    from safetensors.torch import save_file

    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    loads_same(tmp_path / "backbone.pth", source)
    loads_same(tmp_path / "backbone.safetensors", source)


def test_timm_vit_state_dict_with_classifier_head(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    assert "head.weight" in ref.state_dict()
    model, _ = build_backbone(tmp_path / "timm.pth")
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref.forward_head(ref.forward_features(X), pre_logits=True),
                                   atol=1e-5, rtol=0)
    assert load_pretrained_weights(vit_tiny(16, img_size=32), tmp_path / "timm.pth") == ([], [])
    wrapped, _ = build_backbone(tmp_path / "timm.pth", arch="timm/vit_tiny_patch16_224", img_size=32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(X), model(X), atol=1e-5, rtol=0)


def test_timm_dinov2_with_registers(tmp_path):
    """timm keeps registers in reg_token and gives [CLS] no position slot."""
    torch.manual_seed(2)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28,
                            embed_dim=192, num_heads=3).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith((".gamma", "pos_embed", "reg_token")):
                p.normal_(0, 1)
    assert ref.state_dict()["pos_embed"].shape == (1, 4, 192)
    torch.save(ref.state_dict(), tmp_path / "timm_reg.pth")
    model, _ = build_backbone(tmp_path / "timm_reg.pth")
    assert model.num_register_tokens == 4 and model.patch_size == 14
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_layout(tmp_path, registers):
    """DINOv2 backbones: LayerScale ls1/ls2.gamma, patch 14, mask_token, optional register_tokens; also inside a
    DINOv2 training checkpoint (teacher with backbone., dino_head., ibot_head.)."""
    torch.manual_seed(3)
    source = VisionTransformer(img_size=28, patch_size=14, embed_dim=192, depth=12, num_heads=3, init_values=1e-5,
                               num_register_tokens=registers, mask_token=True).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith((".gamma", "register_tokens")):
                p.normal_(0, 1)
    sd = source.state_dict()
    assert "blocks.0.ls1.gamma" in sd and "mask_token" in sd and ("register_tokens" in sd) == bool(registers)
    torch.save(sd, tmp_path / "dinov2.pth")
    x = torch.randn(2, 3, 42, 28)  # any size: positions are interpolated
    loads_same(tmp_path / "dinov2.pth", source, x)
    teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.mlp.0.weight": torch.zeros(4, 192),
               "ibot_head.mlp.0.weight": torch.zeros(4, 192)}
    torch.save({"teacher": teacher, "iteration": 10}, tmp_path / "dinov2_train.pth")
    loads_same(tmp_path / "dinov2_train.pth", source, x)


def test_unknown_layout_lists_expected_keys(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"matches no known layout.*expected keys \[cls_token, pos_embed, "
                                        r"patch_embed.proj.weight.*found \[conv1.weight, fc.weight\]"):
        build_backbone(tmp_path / "resnet.pth")


def test_mismatches_are_user_errors(tmp_path, source):
    torch.save({"teacher": with_head(source), "student": with_head(source)}, tmp_path / "ckpt.pth")
    with pytest.raises(UserError, match="another architecture.*--arch"):
        build_backbone(tmp_path / "ckpt.pth", arch="vit_small")
    with pytest.raises(UserError, match="no key 'ema'.*one of: teacher, student"):
        build_backbone(tmp_path / "ckpt.pth", checkpoint_key="ema")
    partial = {k: v for k, v in source.state_dict().items() if k != "norm.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing keys \[norm.weight\]"):
        build_backbone(tmp_path / "partial.pth")
