import pytest
import timm
import torch
from safetensors.torch import load_file as load_safetensors

import export_weights
from core.dino import DINOHead, MultiCropWrapper
from core.errors import UserError, run_cli
from core.vision_transformer import VisionTransformer, vit_tiny


def training_checkpoint(backbone, path):
    """Our main_dino layout: student with module., teacher without, args as a dict."""
    teacher = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16))
    torch.save({"student": {f"module.{k}": v for k, v in teacher.state_dict().items()},
                "teacher": teacher.state_dict(), "epoch": 1,
                "args": {"arch": "vit_tiny", "patch_size": 16, "global_crops_size": 32}}, path)


def test_export_round_trips_into_ours_and_timm(tmp_path):
    torch.manual_seed(0)
    source = vit_tiny(16, img_size=32).eval()
    training_checkpoint(source, tmp_path / "checkpoint.pth")
    outputs = export_weights.main(export_weights.get_args_parser().parse_args([str(tmp_path / "checkpoint.pth")]))
    assert outputs == [tmp_path / f"checkpoint_teacher_backbone{suffix}" for suffix in (".pth", ".safetensors")]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
    ours = vit_tiny(16, img_size=32).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    for state in (torch.load(outputs[0], weights_only=True), load_safetensors(outputs[1])):
        assert state.keys() == source.state_dict().keys()
        ours.load_state_dict(state, strict=True)
        ref.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.equal(ours(x), expected)
            torch.testing.assert_close(ref(x), expected, atol=1e-5, rtol=0)


def test_export_registers_in_timm_layout(tmp_path):
    """A DINOv2-with-registers backbone exported with --layout timm loads strictly into timm's DINOv2 register ViT
    (reg_token, no [CLS] position slot) and gives the same output."""
    torch.manual_seed(1)
    source = VisionTransformer(img_size=28, patch_size=14, embed_dim=192, depth=12, num_heads=3, init_values=1.0,
                               num_register_tokens=4, mask_token=True).eval()
    with torch.no_grad():
        source.pos_embed.normal_(0, 1)
    torch.save(source.state_dict(), tmp_path / "dinov2.pth")
    args = export_weights.get_args_parser().parse_args(
        [str(tmp_path / "dinov2.pth"), "--layout", "timm", "--output", str(tmp_path / "timm.safetensors")])
    export_weights.main(args)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28,
                            embed_dim=192, num_heads=3).eval()
    ref.load_state_dict(load_safetensors(tmp_path / "timm.safetensors"), strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), source(x), atol=1e-5, rtol=0)


def test_export_bad_output_name_is_one_line_error(tmp_path, capsys):
    argv = [str(tmp_path / "missing.pth"), "--output", str(tmp_path / "w.bin")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: export_weights.main(export_weights.get_args_parser().parse_args(argv)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --output {tmp_path / 'w.bin'}: the name must end in "
                                                    f".pth or .safetensors"]


def test_export_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_weights.main(export_weights.get_args_parser().parse_args([str(tmp_path / "missing.pth")]))
