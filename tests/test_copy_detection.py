import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import eval_copy_detection
from conftest import one_line_error, read_scalars
from core.config import parse_args
from core.retrieval import trapezoid_ap
from core.vision_transformer import build_vit

IMSIZE = 64


def test_holidays_ap_by_hand():
    """Two positives retrieved at 0-based ranks 0 and 3: (1 + 1)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/2 + 5/24 = 17/24;
    only one of two found, at rank 1: (0/1 + 1/2)/2 * 1/2 = 1/8."""
    assert trapezoid_ap([0, 3], 2) == pytest.approx(17 / 24, abs=1e-12)
    assert trapezoid_ap([1], 2) == pytest.approx(1 / 8, abs=1e-12)


def tiny_checkpoint(path):
    torch.manual_seed(0)
    model = build_vit("vit_tiny", 16).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return model


@torch.no_grad()
def original_way_features(model, paths):
    """DINO's copy-detection extraction: PIL bicubic resize to a square, batches of 16 in list order, the last
    block's normed tokens, [CLS] next to avg_pool2d of clamp(x, 1e-6)^4 over the patch grid, ^(1/4)."""
    transform = T.Compose([T.Resize((IMSIZE, IMSIZE), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    rows = []
    for start in range(0, len(paths), 16):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + 16]])
        feats = model.get_intermediate_layers(x, n=1)[0]
        b, h, w = len(x), IMSIZE // 16, IMSIZE // 16
        grid = feats[:, 1:].reshape(b, h, w, -1).clamp(min=1e-6).permute(0, 3, 1, 2)
        rows.append(torch.cat((feats[:, 0], F.avg_pool2d(grid.pow(4), (h, w)).pow(1 / 4).reshape(b, -1)), dim=1))
    return torch.cat(rows).double()


def original_way_scores(model, root, blocks, distractors, whitening):
    """The original's pipeline on those features: centre by the whitening mean, PCA class (eigh of the uncentred
    second moment, floor, sort, diag(d^-0.5) V^T), L2, top-20 by similarity, per-block AP loop; strong copies match
    originals by the first 4 characters of the file name."""
    originals = sorted((root / "original").glob("*.jpg"))
    queries = [p for b in blocks for p in sorted((root / b).glob("*.jpg"))]
    q = original_way_features(model, queries)
    db = original_way_features(model, originals + distractors)
    wf = original_way_features(model, whitening).numpy()
    mean = wf.mean(axis=0)
    d, v = np.linalg.eigh(wf.T @ wf / len(wf))
    d[d < d.max() * 1e-5] = d.max() * 1e-5
    idx = np.argsort(d)[::-1]
    dvt = np.diag(1.0 / d[idx] ** 0.5) @ v[:, idx].T
    q, db = [torch.from_numpy((x.numpy() - mean) @ dvt.T) for x in (q, db)]
    sim = F.normalize(q, dim=1) @ F.normalize(db, dim=1).T
    ids = sim.topk(20, dim=1).indices.tolist()
    scores, j0 = {}, 0
    for b in blocks:
        names = sorted(p.name for p in (root / b).glob("*.jpg"))
        if b == "strong":
            positives = [[j for j, o in enumerate(originals) if o.name[:4] == n[:4]] for n in names]
        else:
            positives = [[i] for i in range(len(names))]
        total = 0.0
        for qno, line in enumerate(ids[j0:j0 + len(names)]):
            ranks = [rank for rank, bno in enumerate(line) if bno in positives[qno]]
            total += trapezoid_ap(ranks, len(positives[qno]))
        scores[b] = total / len(names)
        j0 += len(names)
    return scores


def strong_copy(image, seed):
    """A strong attack: crop, rotation, colour change and blur."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
    attack = T.Compose([T.RandomResizedCrop(image.size[::-1], scale=(0.4, 0.7)), T.RandomRotation(20),
                        T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.GaussianBlur(5)])
    return attack(image)


def copydays_folder(root, source):
    """Copydays' layout from real photos: 10 originals 20jj00.jpg, 2 strong copies 20jj01/02.jpg of the first 5,
    jpegqual/30 re-encodings and crops/50 central crops of all (same names)."""
    photos = sorted(source.rglob("*.JPEG"))
    for sub in ("original", "strong", "jpegqual/30", "crops/50"):
        (root / sub).mkdir(parents=True)
    for j, path in enumerate(photos[:10]):
        image = Image.open(path).convert("RGB")
        name = f"20{j:02d}00.jpg"
        image.save(root / "original" / name, quality=95)
        image.save(root / "jpegqual" / "30" / name, quality=30)
        w, h = image.size
        image.crop((w // 4, h // 4, w - w // 4, h - h // 4)).save(root / "crops" / "50" / name, quality=95)
        if j < 5:
            for c in (1, 2):
                strong_copy(image, 10 * j + c).save(root / "strong" / f"20{j:02d}0{c}.jpg", quality=95)
    return photos[10:30], photos[30:430]


def run(argv):
    args = parse_args(eval_copy_detection.get_args_parser(), "eval_copy_detection", [str(a) for a in argv])
    return eval_copy_detection.main(args)


def test_copydays_end_to_end_against_the_original_way(shared_data, tmp_path):
    distractors, whitening = copydays_folder(tmp_path / "copydays", shared_data / "imagenette-160" / "val")
    (tmp_path / "distractors").mkdir()
    (tmp_path / "whitening").mkdir()
    for folder, paths in (("distractors", distractors), ("whitening", whitening)):
        for p in paths:
            (tmp_path / folder / p.name).symlink_to(p)
    model = tiny_checkpoint(tmp_path / "ckpt.pth")
    common = ["--imsize", IMSIZE, "--num_workers", 0, "--batch_size_per_gpu", 64]
    results = run(["--data_path", tmp_path / "copydays", "--whitening_path", tmp_path / "whitening",
                   "--distractors_path", tmp_path / "distractors", "--pretrained_weights", tmp_path / "ckpt.pth",
                   "--output_dir", tmp_path / "out", "--dump_features", tmp_path / "f", *common])
    blocks = ["original", "strong", "jpegqual/30", "crops/50"]
    assert list(results) == blocks
    expected = original_way_scores(model, tmp_path / "copydays", blocks, sorted(distractors),
                                   sorted(whitening))
    assert results == pytest.approx(expected, abs=1e-6)
    assert results["original"] == 1.0 and results["jpegqual/30"] > 0.8 and 0 < results["strong"] < 1
    record = json.loads((tmp_path / "out" / "copy_detection.json").read_text())
    assert record == {"mAP": results, "strong": results["strong"]}
    assert run(["--load_features", tmp_path / "f", *common]) == results


def write_image(path, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).save(path)


def own_copies(root):
    """original/{cat,dog,owl}.jpg; blur/cat.jpg and blur/dog_2.png; edits/small/owl_x.jpg (copies named after their
    original: same stem, or stem + '_')."""
    for sub in ("original", "blur", "edits/small"):
        (root / sub).mkdir(parents=True)
    for seed, name in enumerate(("cat", "dog", "owl")):
        write_image(root / "original" / f"{name}.jpg", seed)
    write_image(root / "blur" / "cat.jpg", 0, (44, 40))
    write_image(root / "blur" / "dog_2.png", 1, (40, 48))
    write_image(root / "edits" / "small" / "owl_x.jpg", 2, (30, 24))


def test_own_folder_of_copies(tmp_path):
    own_copies(tmp_path / "mine")
    originals, blocks = eval_copy_detection.read_copies(tmp_path / "mine")
    assert [o.name for o in originals] == ["cat.jpg", "dog.jpg", "owl.jpg"]
    assert [(name, [q.name for q in queries], positives) for name, queries, positives in blocks] == [
        ("blur", ["cat.jpg", "dog_2.png"], [[0], [1]]), ("edits/small", ["owl_x.jpg"], [[2]])]
    results = run(["--data_path", tmp_path / "mine", "--arch", "vit_tiny", "--patch_size", 16, "--imsize", IMSIZE,
                   "--num_workers", 0, "--log_dir", tmp_path / "tb"])
    assert set(results) == {"blur", "edits/small"} and all(0 < v <= 1 for v in results.values())
    logged = read_scalars(tmp_path / "tb")
    assert logged == {f"mAP/{k}": [(0, pytest.approx(v))] for k, v in results.items()}


def test_original_flags_and_defaults():
    args = parse_args(eval_copy_detection.get_args_parser(), "eval_copy_detection", [])
    assert {k: getattr(args, k) for k in ("data_path", "whitening_path", "distractors_path", "imsize",
                                          "batch_size_per_gpu", "use_cuda", "checkpoint_key", "num_workers",
                                          "dist_url", "local_rank")} == {
        "data_path": "/path/to/copydays/", "whitening_path": "/path/to/whitening_data/",
        "distractors_path": "/path/to/distractors/", "imsize": 320, "batch_size_per_gpu": 16, "use_cuda": True,
        "checkpoint_key": "teacher", "num_workers": 10, "dist_url": "env://", "local_rank": 0}


def cli_error(argv, capsys):
    return one_line_error(lambda: run(argv), capsys)


def test_copy_detection_bad_input(tmp_path, capsys):
    common = ["--arch", "vit_tiny", "--patch_size", 16, "--imsize", IMSIZE, "--num_workers", 0]
    assert "original is not a folder" in cli_error(["--data_path", tmp_path, *common], capsys)
    own_copies(tmp_path / "mine")
    write_image(tmp_path / "mine" / "blur" / "zebra.jpg", 5)
    message = cli_error(["--data_path", tmp_path / "mine", *common], capsys)
    assert f"copy {tmp_path / 'mine' / 'blur' / 'zebra.jpg'} is named after no image of" in message
    (tmp_path / "mine" / "blur" / "zebra.jpg").unlink()
    message = cli_error(["--data_path", tmp_path / "mine", "--whitening_path", tmp_path / "nope", *common], capsys)
    assert f"--whitening_path {tmp_path / 'nope'} is not a folder" in message
    (tmp_path / "mine" / "blur" / "cat.jpg").write_bytes(b"broken")
    message = cli_error(["--data_path", tmp_path / "mine", *common], capsys)
    assert f"cannot decode image {tmp_path / 'mine' / 'blur' / 'cat.jpg'}" in message
    (tmp_path / "cd" / "original").mkdir(parents=True)
    (tmp_path / "cd" / "jpegqual" / "3").mkdir(parents=True)
    write_image(tmp_path / "cd" / "original" / "200000.jpg", 0)
    write_image(tmp_path / "cd" / "original" / "200100.jpg", 1)
    write_image(tmp_path / "cd" / "jpegqual" / "3" / "200000.jpg", 0)
    message = cli_error(["--data_path", tmp_path / "cd", *common], capsys)
    assert "jpegqual/3 has 1 images but original/ has 2" in message
