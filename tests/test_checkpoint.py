import argparse
import os

import pytest
import torch

from core.checkpoint import load_pretrained_weights, restart_from_checkpoint, save_checkpoint
from core.dino import DINOHead, MultiCropWrapper
from core.errors import UserError
from core.vision_transformer import VisionTransformer


def tiny_vit(**kw):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, **kw)


def official_full_checkpoint(backbone):
    """A file in the official DINO layout: DDP student with module.backbone., teacher with backbone., a head."""
    head = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16)
    student = {f"module.{k}": v for k, v in MultiCropWrapper(backbone, head).state_dict().items()}
    teacher = MultiCropWrapper(backbone, head).state_dict()
    return {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16), "dino_loss": {"center": torch.zeros(1, 64)}}


def test_load_official_dino_layout(tmp_path):
    source = tiny_vit()
    torch.save(official_full_checkpoint(source), tmp_path / "full.pth")
    for key in ("teacher", "student"):
        model = tiny_vit()
        assert load_pretrained_weights(model, tmp_path / "full.pth", key) == ([], [])
        for name, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[name], value)


def test_load_backbone_only_and_errors(tmp_path):
    source = tiny_vit()
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = tiny_vit()
    load_pretrained_weights(model, tmp_path / "backbone.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), source.eval()(x))
    wide = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3)
    with pytest.raises(UserError, match="another architecture"):
        load_pretrained_weights(wide, tmp_path / "backbone.pth")
    deeper = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    with pytest.raises(UserError, match=r"missing keys \[blocks\.2\."):
        load_pretrained_weights(deeper, tmp_path / "backbone.pth")
    torch.save(official_full_checkpoint(source), tmp_path / "full.pth")
    with pytest.raises(UserError, match="student, teacher"):
        load_pretrained_weights(model, tmp_path / "full.pth", checkpoint_key="ema")
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_weights(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained_weights(model, tmp_path / "junk.pth")


def test_atomic_save_keeps_last_good_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_restart_restores_objects_and_rng(tmp_path):
    model, opt_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(opt_model.parameters(), lr=0.1, momentum=0.9)
    opt_model(torch.randn(1, 2)).sum().backward()
    opt.step()
    torch.manual_seed(3)
    from core.checkpoint import rng_state
    state = rng_state()
    expected_draw = torch.rand(3)
    save_checkpoint({"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                     "optimizer": opt.state_dict(), "epoch": 7, "rng": [state]}, tmp_path / "c.pth")
    fresh, fresh_opt = torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    out = restart_from_checkpoint(tmp_path / "c.pth", {"epoch": 0}, model=fresh, optimizer=fresh_opt)
    assert out == {"epoch": 7}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["param_groups"][0]["momentum"] == 0.9
    assert torch.equal(torch.rand(3), expected_draw)
    assert restart_from_checkpoint(tmp_path / "none.pth", {"epoch": 0}) == {"epoch": 0}
    with pytest.raises(UserError, match="does not match"):
        restart_from_checkpoint(tmp_path / "c.pth", {}, model=torch.nn.Linear(3, 2))
