"""Hugging Face and Google ViT weights in our ViT: outputs compared with transformers' own model, the .npz layout
checked by a round trip through a writer of Google's key layout written here independently."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import load_backbone_state, read_backbone, use_source_norm_eps
from core.errors import UserError
from core.features import build_backbone
from core.vision_transformer import VisionTransformer
from main_finetune import load_finetune_weights


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")


def hf_model(transformers, folder, hidden=64, layers=2, heads=4, classifier=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=4 * hidden, image_size=32, patch_size=8)
    model = (transformers.ViTForImageClassification if classifier else transformers.ViTModel)(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to constants: random ones test the mapping
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def our_vit(**kwargs):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kwargs).eval()


def test_hf_folder_matches_transformers(transformers, tmp_path):
    hf = hf_model(transformers, tmp_path / "vit")
    state_dict, stored = read_backbone(tmp_path / "vit")
    ours = our_vit()
    load_backbone_state(ours, state_dict, "hf", strict=True)
    use_source_norm_eps(ours, stored)
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True)
        x = ours.prepare_tokens(images)
        hidden = [x]
        for block in ours.blocks:
            x = block(x)
            hidden.append(x)
        cls = ours(images)
    assert len(hidden) == len(expected.hidden_states) == 3
    for got, want in zip(hidden, expected.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(hidden[-1]), expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, expected.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_hf_classifier_bin_and_accounting(transformers, tmp_path):
    """ViTForImageClassification saved as pytorch_model.bin: classifier dropped, the backbone identical to the
    safetensors load; an unknown tensor or a non-ViT model stops with a one-line error."""
    folder = tmp_path / "cls"
    hf_model(transformers, folder, classifier=True)
    from_safetensors, _ = read_backbone(folder)
    tensors = load_file(folder / "model.safetensors")
    assert "classifier.weight" in tensors
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    from_bin, _ = read_backbone(folder)
    assert set(from_bin) == set(our_vit().state_dict())  # the backbone's tensors only: classifier dropped
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)

    torch.save({**tensors, "vit.encoder.layer.0.adapter.weight": torch.zeros(3)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="adapter"):
        read_backbone(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(UserError, match="bert"):
        read_backbone(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        read_backbone(folder)


def test_hf_through_build_backbone_and_finetune(transformers, tmp_path):
    """The evaluations' loader and main_finetune --finetune take the folder; vit_tiny-sized, so arch is inferred."""
    hf = hf_model(transformers, tmp_path / "tiny", hidden=192, layers=12, heads=3)
    model, _ = build_backbone(str(tmp_path / "tiny"))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), hf(pixel_values=images).last_hidden_state[:, 0],
                                   atol=1e-5, rtol=1e-5)
    classifier = VisionTransformer(img_size=48, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=5)
    load_finetune_weights(classifier, str(tmp_path / "tiny"))
    torch.testing.assert_close(classifier.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    assert classifier.pos_embed.shape[1] == 1 + 6 * 6  # resized from the 4x4 grid of the source


def test_hub_name_uses_local_cache_only(transformers, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="nothing is downloaded"):
        read_backbone("google/vit-base-patch16-224-in21k")
    snapshot = tmp_path / "hub" / "models--google--tiny-vit" / "snapshots" / "abc123"
    hf_model(transformers, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    state_dict, stored = read_backbone("google/tiny-vit")
    assert stored["layer_norm_eps"] == 1e-12 and "blocks.1.attn.qkv.weight" in state_dict


def google_npz(model, path):
    """Our ViT written in the key layout of google-research/vision_transformer's checkpoints (flax: kernels (in, out),
    conv kernels HWIO, attention kernels split by head), plus a pre-logits layer and a head, as in the in21k files."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "pre_logits/kernel": np.ones((dim, dim), np.float32), "pre_logits/bias": np.zeros(dim, np.float32),
        "head/kernel": np.ones((dim, 7), np.float32), "head/bias": np.zeros(7, np.float32),
    }
    for i in range(len(model.blocks)):
        p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = b + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            w = sd[p + "attn.qkv.weight"][j * dim:(j + 1) * dim]
            out[attn + name + "/kernel"] = w.T.reshape(dim, heads, dim // heads)
            out[attn + name + "/bias"] = sd[p + "attn.qkv.bias"][j * dim:(j + 1) * dim].reshape(heads, dim // heads)
        out[attn + "out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        out[attn + "out/bias"] = sd[p + "attn.proj.bias"]
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[b + theirs + "/scale"] = sd[p + ours + ".weight"]
            out[b + theirs + "/bias"] = sd[p + ours + ".bias"]
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[b + "MlpBlock_3/" + theirs + "/kernel"] = sd[p + "mlp." + ours + ".weight"].T
            out[b + "MlpBlock_3/" + theirs + "/bias"] = sd[p + "mlp." + ours + ".bias"]
    np.savez(path, **out)


def test_google_npz_round_trip(tmp_path):
    torch.manual_seed(0)
    model = our_vit()
    google_npz(model, tmp_path / "ViT-T_8.npz")
    state_dict, stored = read_backbone(tmp_path / "ViT-T_8.npz")
    assert stored == {}  # flax LayerNorm's eps is 1e-6, ours
    own = model.state_dict()
    assert set(state_dict) == set(own)  # pre-logits and head dropped
    for k, v in state_dict.items():
        assert torch.equal(v, own[k]), k
    loaded = our_vit()
    load_backbone_state(loaded, state_dict, "npz", strict=True)
    images = torch.randn(2, 3, 40, 24)  # another size: position embeddings interpolated the same way
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_google_npz_unknown_and_corrupt(tmp_path):
    np.savez(tmp_path / "hybrid.npz", **{"embedding/kernel": np.zeros((8, 8, 3, 4), np.float32),
                                         "block1/unit1/conv1/kernel": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match="block1/unit1"):
        read_backbone(tmp_path / "hybrid.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="bad.npz"):
        read_backbone(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="does not exist"):
        read_backbone(tmp_path / "missing.npz")
