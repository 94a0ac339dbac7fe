import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

import core.synthetic as synthetic
from core.augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, eval_transform
from core.gpu_augment import blur_kernel_size, gaussian_blur
from core.data import ImageDataset, build_loader, collate_skip_bad
from core.errors import UserError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalise(x):
    return x * STD + MEAN


def random_image(seed, size=(40, 48), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def save_images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        random_image(seed + i).save(folder / name)


def test_multicrop_count_shapes_dtype():
    aug = DataAugmentationDINO(local_crops_number=3, global_size=32, local_size=16)
    crops = aug(random_image(0))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in crops)


def test_multicrop_values_are_normalised_uint8_levels():
    """Ops run on uint8, so undoing the ImageNet normalisation must give exact multiples of 1/255 in [0, 1]."""
    torch.manual_seed(0)
    crops = DataAugmentationDINO(local_crops_number=2, global_size=24, local_size=12)(random_image(1))
    for c in crops:
        levels = unnormalise(c) * 255
        assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3
        torch.testing.assert_close(levels, levels.round(), atol=2e-3, rtol=0)


def test_eval_transform_normalisation_and_geometry():
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    out = eval_transform(resize=32, crop=24)(Image.new("RGB", (48, 40), mean_colour))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert out.abs().max() < 0.5 / 255 / min(IMAGENET_STD)
    white = eval_transform(resize=32, crop=24)(Image.new("RGB", (48, 40), (255, 255, 255)))
    torch.testing.assert_close(white, ((1 - MEAN) / STD).expand(3, 24, 24))
    gradient = Image.fromarray(np.tile(np.arange(80, dtype=np.uint8) * 3, (40, 1)))
    out = eval_transform(resize=20, crop=20)(gradient.convert("RGB"))
    assert out.shape == (3, 20, 20)  # short side 40 -> 20, width 80 -> 40, centre 20 columns kept
    left, right = unnormalise(out)[0, 10, [0, -1]] * 255
    assert abs(left - 61.5) < 1.5 and abs(right - 175.5) < 1.5


def test_solarisation_only_on_second_global_crop():
    """A white image stays >= 0.6 * 255 under the colour ops; only solarisation can bring it below 128."""
    aug = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8)
    white = Image.new("RGB", (24, 24), (255, 255, 255))
    random.seed(0)
    dark = torch.zeros(3)
    trials = 200
    for _ in range(trials):
        crops = aug(white)
        dark += torch.tensor([float(unnormalise(c).min() < 0.5) for c in crops])
    assert dark[0] == 0 and dark[2] == 0
    assert 0.12 < dark[1] / trials < 0.28  # p = 0.2, binomial sd ~ 0.028
    assert [solarize_p for *_, solarize_p in aug.views] == [0.0, 0.2, 0.0]


def test_blur_probabilities_per_view():
    aug = DataAugmentationDINO()
    assert [blur_p for _, _, blur_p, _ in aug.views] == [1.0, 0.1] + [0.5] * 8
    assert aug.sigma_scale == 1.0
    # Smaller crops keep the same blur relative to the crop: sigma in pixels scales with global_size / 224.
    assert DataAugmentationDINO(global_size=64, local_size=32).sigma_scale == pytest.approx(64 / 224)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gpu_blur_kernel_matches_pil_radius(sigma):
    """DINO blurs with PIL's GaussianBlur(radius=sigma), an extended box blur; --gpu_augment's true Gaussian with
    the recipe's kernel (13 taps at 224 px) must be close to it."""
    image = random_image(2, size=(12, 12)).resize((60, 60), Image.NEAREST)
    ref = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=float)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()

    def error(kernel):
        out = gaussian_blur(tensor, torch.tensor([sigma]), kernel)[0].permute(1, 2, 0).numpy()
        return np.abs(out - ref)[8:-8, 8:-8].mean()

    assert blur_kernel_size(2.0) == 13
    assert error(13) < 1.0
    if sigma == 2.0:
        assert error(7) > 3.0  # a kernel covering only 1.5 sigma is visibly wrong


def test_imagefolder_tree_matches_torchvision(tmp_path):
    save_images(tmp_path / "dog", ["b.png", "a.jpg", "c.JPEG"])
    save_images(tmp_path / "cat" / "nested", ["x.png"])
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageDataset(tmp_path)
    ref = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.samples == ref.samples
    assert ds.targets == [0, 1, 1, 1]
    image, target = ds[1]
    assert target == 1 and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "dog" / "a.jpg")))


def test_flat_folder_without_classes(tmp_path):
    save_images(tmp_path, ["b.png", "a.png"])
    save_images(tmp_path / "sub", ["c.png"], seed=5)
    random_image(9, mode="L").save(tmp_path / "grey.png")
    ds = ImageDataset(tmp_path, transform=v2.Compose([v2.PILToTensor()]))
    assert ds.classes == [] and ds.class_to_idx == {}
    assert [p for p, _ in ds.samples] == [str(tmp_path / n) for n in ["a.png", "b.png", "grey.png", "sub/c.png"]]
    assert ds.targets == [0, 0, 0, 0]
    grey, target = ds[2]
    assert target == 0 and grey.shape == (3, 48, 40)
    assert torch.equal(grey[0], torch.from_numpy(np.array(random_image(9, mode="L"))))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    save_images(tmp_path, [f"{i}.png" for i in range(5)])
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg" * 10)
    ds = ImageDataset(tmp_path, transform=v2.Compose([v2.PILToTensor()]))
    bad = [p for p, _ in ds.samples].index(str(tmp_path / "x.jpg"))
    with pytest.warns(UserWarning, match="x.jpg"):
        assert ds[bad] is None

    good = ds[0]
    samples, targets, n_bad = collate_skip_bad([good, None, good])
    assert n_bad == 1 and samples.shape == (2, 3, 48, 40) and targets.tolist() == [0, 0]
    assert collate_skip_bad([None, None]) == (None, None, 2)

    loader = build_loader(ds, batch_size=4, num_workers=0, shuffle=False, drop_last=False)
    seen, total_bad = [], 0
    with pytest.warns(UserWarning, match="x.jpg"):
        for samples, _, n_bad in loader:
            total_bad += n_bad
            seen += list(samples) if samples is not None else []
    assert total_bad == 1 and len(seen) == 5
    expected = [torch.from_numpy(np.array(random_image(i))).permute(2, 0, 1) for i in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.tensor(i), 0


def test_loader_order_depends_only_on_seed_and_epoch():
    """A resumed run calls set_epoch(epoch) on a fresh loader and must see the same order as the first run."""
    def order(epoch, seed=0):
        loader = build_loader(Indices(), batch_size=4, num_workers=0, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([x for x, _, _ in loader]).tolist()

    assert order(3) == order(3)
    assert sorted(order(3)) == list(range(20))
    assert order(3) != order(4) and order(3) != order(3, seed=1)
    loader = build_loader(Indices(), batch_size=4, num_workers=1)
    assert loader.drop_last and loader.num_workers == 1
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.sampler.num_replicas == 1 and loader.sampler.rank == 0


def test_seeded_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    """Crops must not depend on the worker count, so that a resumed or rescaled run sees the same views."""
    save_images(tmp_path, [f"{i}.png" for i in range(4)])
    aug = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8)
    ds = ImageDataset(tmp_path, transform=aug, seed=0)

    def views(num_workers, epoch):
        ds.set_epoch(epoch)
        loader = build_loader(ds, batch_size=2, num_workers=num_workers, shuffle=False)
        return [torch.cat([c.flatten() for c in crops]) for crops, _, _ in loader]

    first = views(0, epoch=1)
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(first, views(2, epoch=1)))
    assert not any(torch.equal(a, b) for a, b in zip(first, views(0, epoch=2)))


def test_loader_rejects_batch_larger_than_dataset(tmp_path):
    save_images(tmp_path, ["a.png", "b.png"])
    with pytest.raises(UserError, match="batch size 4"):
        build_loader(ImageDataset(tmp_path), batch_size=4, num_workers=0)


def test_bad_paths_raise_user_error(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=str(missing)):
        ImageDataset(missing)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        ImageDataset(tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=f"no images found in {empty}.*\\.png"):
        ImageDataset(empty)


def test_synthetic_is_deterministic_with_imagefolder_layout(tmp_path):
    a = synthetic.ensure_default_data(tmp_path / "a", train_per_class=2, val_per_class=1)
    b = synthetic.ensure_default_data(tmp_path / "b", train_per_class=2, val_per_class=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    train, val = ImageDataset(a / "train"), ImageDataset(a / "val")
    assert train.classes == sorted(synthetic.CLASSES) and len(train.classes) == 10
    assert len(train) == 20 and len(val) == 10 and val.classes == train.classes
    image, _ = train[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_synthetic_is_reused_and_checks_settings(tmp_path, monkeypatch):
    root = synthetic.ensure_default_data(tmp_path / "d", train_per_class=1, val_per_class=1)
    monkeypatch.setattr(synthetic, "generate", lambda *a: pytest.fail("regenerated a complete dataset"))
    assert synthetic.ensure_default_data(root, train_per_class=1, val_per_class=1) == root
    with pytest.raises(UserError, match=str(root)):
        synthetic.ensure_default_data(root, train_per_class=2, val_per_class=1)


def test_default_data_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSSL_DATA_CACHE", str(tmp_path / "cache"))
    assert synthetic.default_data_dir() == tmp_path / "cache"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    render = synthetic.render

    def failing_render(name, rng):
        calls.append(name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render(name, rng)

    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_default_data(tmp_path / "d", train_per_class=2, val_per_class=1)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_generation_gives_one_complete_dataset(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(synthetic.ensure_default_data(tmp_path / "d", train_per_class=3, val_per_class=1))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [tmp_path / "d"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    assert len(list((tmp_path / "d").rglob("*.png"))) == 40


def test_synthetic_mean_colour_does_not_predict_class():
    """Nearest-centroid on an image's mean chromaticity stays near chance (10%): the class is in the shape."""
    def chroma(split):
        x, y = [], []
        for c, name in enumerate(synthetic.CLASSES):
            for i in range(30):
                mean = np.asarray(synthetic.render(name, np.random.default_rng([9, split, c, i])), float).mean((0, 1))
                x.append(mean / mean.sum())
                y.append(c)
        return np.array(x), np.array(y)

    (xa, ya), (xb, yb) = chroma(0), chroma(1)
    centroids = np.stack([xa[ya == c].mean(0) for c in range(10)])
    accuracy = (((xb[:, None] - centroids) ** 2).sum(-1).argmin(1) == yb).mean()
    assert accuracy < 0.2


def test_dino_augmentation_on_real_images(shared_data):
    root = shared_data / "imagenette-160" / "val"
    aug = DataAugmentationDINO(local_crops_number=2, global_size=64, local_size=32)
    ds = ImageDataset(root, transform=aug)
    assert len(ds.classes) == 10 and len(ds) == 3925 and ds.classes == sorted(ds.classes)
    for index in (0, 1000, 3924):
        crops, target = ds[index]
        assert target == ds.targets[index]
        assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
        for c in crops:
            assert unnormalise(c).min() > -1e-3 and unnormalise(c).max() < 1 + 1e-3
    image, _ = ImageDataset(root, transform=eval_transform(resize=72, crop=64))[5]
    assert image.shape == (3, 64, 64)
