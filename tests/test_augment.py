"""DINO's augmentation: the CPU pipeline's PIL operations and the batched --gpu_augment operations against
torchvision on the same parameters, their random parameters against the recipe, and view statistics on real images
against the original torchvision chain."""
import itertools
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

from bench.bench_augment import OriginalAugmentation
from core import augment, gpu_augment
from conftest import one_line_error
from core.augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from core.data import ImageDataset, build_loader
from core.gpu_augment import GPUAugmentDINO

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def photo(seed, size=(37, 29)):
    """A smooth random colour image (random pixels would make every statistic trivial)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


@pytest.mark.parametrize("factor", [0.6, 0.77, 1.0, 1.23, 1.4])
def test_pil_colour_ops_equal_torchvision(factor):
    for seed in range(3):
        image = photo(seed)
        for ours, theirs in ((augment.adjust_brightness, F1.adjust_brightness),
                             (augment.adjust_contrast, F1.adjust_contrast),
                             (augment.adjust_saturation, F1.adjust_saturation)):
            assert np.array_equal(np.asarray(ours(image, factor)), np.asarray(theirs(image, factor))), ours
        hue = (factor - 1) / 4  # within the recipe's +-0.1, negative ones included
        assert np.array_equal(np.asarray(augment.adjust_hue(image, hue)), np.asarray(F1.adjust_hue(image, hue)))


def test_normalized_tensor_equals_to_tensor_normalize():
    image = photo(0)
    ours = augment.normalized_tensor(image)
    reference = F1.normalize(F1.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    grey = augment.normalized_tensor(image.convert("L"))
    reference = F1.normalize(F1.to_tensor(image.convert("L").convert("RGB")), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(grey, reference, atol=1e-5, rtol=0)


def test_crop_box_distribution_matches_torchvision():
    random.seed(0)
    boxes = np.array([augment.random_resized_crop_box(160, 120, (0.05, 0.4)) for _ in range(4000)])
    w, h = boxes[:, 2], boxes[:, 3]
    area = w * h / (160 * 120)
    assert area.min() > 0.04 and area.max() < 0.41
    assert abs(area.mean() - 0.225) < 0.01  # uniform area fraction (rounding of w and h aside)
    log_ratio = np.log(w / h)
    assert np.abs(log_ratio).max() < math.log(4 / 3) + 0.05 and abs(log_ratio.mean()) < 0.02
    assert (boxes[:, 0] + w <= 160).all() and (boxes[:, 1] + h <= 120).all() and (boxes[:, :2] >= 0).all()
    # A strip no in-range box fits into falls back to the largest centred crop of ratio 4/3, as torchvision.
    torch.manual_seed(0)
    assert augment.random_resized_crop_box(400, 10, (0.9, 1.0)) == (193, 0, 13, 10)
    assert T.RandomResizedCrop.get_params(Image.new("RGB", (400, 10)), (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 193, 10, 13)


def test_flip_rate_and_crop_geometry():
    """A horizontal ramp keeps its direction through a crop unless flipped; half the crops must be reversed."""
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (90, 1))).convert("RGB")
    random.seed(1)
    flipped = []
    for _ in range(400):
        crop = np.asarray(augment.crop_and_flip(ramp, 24, (0.4, 1.0)), dtype=float)[..., 0]
        assert crop.shape == (24, 24)
        flipped.append(crop[:, -1].mean() < crop[:, 0].mean())
    assert 0.43 < np.mean(flipped) < 0.57  # p = 0.5, sd 0.025


def random_batch(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def test_gpu_colour_ops_equal_torchvision_per_sample():
    x = random_batch()
    factors = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.3, 1.4])
    hues = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    for ours, theirs, f in ((gpu_augment.adjust_brightness, F2.adjust_brightness, factors),
                            (gpu_augment.adjust_contrast, F2.adjust_contrast, factors),
                            (gpu_augment.adjust_saturation, F2.adjust_saturation, factors),
                            (gpu_augment.adjust_hue, F2.adjust_hue, hues)):
        out = ours(x.clone(), f)
        for i in range(len(x)):
            torch.testing.assert_close(out[i], theirs(x[i], float(f[i])), atol=1e-5, rtol=0)
    gray = gpu_augment.grayscale(x)
    for i in range(len(x)):
        torch.testing.assert_close(gray[i], F2.rgb_to_grayscale(x[i]), atol=1e-6, rtol=0)
        torch.testing.assert_close(gpu_augment.solarize(x)[i], F2.solarize(x[i], 128 / 255))


def test_gpu_blur_equals_torchvision_gaussian_blur():
    x = random_batch(n=3, size=24)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = gpu_augment.gaussian_blur(x, sigma, 13)
    for i in range(3):
        torch.testing.assert_close(out[i], F2.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2), atol=1e-5,
                                   rtol=0)


def reference_view(crop, p, i, kernel_size):
    """One sample done by torchvision's tensor functions, one op after the other, with the drawn parameters."""
    ops = {"brightness": F2.adjust_brightness, "contrast": F2.adjust_contrast, "saturation": F2.adjust_saturation,
           "hue": F2.adjust_hue}
    x = crop.permute(2, 0, 1).float() / 255
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            name = list(ops)[op]
            x = ops[name](x, float(p["factors"][name][i]))
    if p["gray"][i]:
        x = F2.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"][i]:
        x = F2.gaussian_blur(x, [kernel_size] * 2, [float(p["sigma"][i])] * 2)
    if p["solarize"][i]:
        x = F2.solarize(x, 128 / 255)
    return F2.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_gpu_augment_equals_per_sample_torchvision_chain():
    """Per-sample order, selections and factors: the batched views equal torchvision run sample by sample."""
    geometry = DataAugmentationDINO(local_crops_number=1, global_size=32, local_size=16, photometric=False)
    aug = GPUAugmentDINO(geometry.views, geometry.sigma_scale, seed=3, batch_size=12)
    random.seed(0)
    samples = [geometry(photo(i, (40, 36))) for i in range(12)]
    crops = [torch.stack(view) for view in zip(*samples)]
    out = aug(crops, step=5)
    params = aug.draw(12, step=5)
    assert len({tuple(o) for o in params[0]["order"].tolist()}) > 1  # orders do differ within the batch
    for view, (batch, p) in enumerate(zip(crops, params)):
        assert out[view].shape == (12, 3, batch.shape[1], batch.shape[2])
        for i in range(12):
            torch.testing.assert_close(out[view][i], reference_view(batch[i], p, i, aug.kernel_size), atol=2e-5,
                                       rtol=0)


def test_gpu_parameters_follow_the_recipe():
    aug = GPUAugmentDINO(DataAugmentationDINO().views, 1.0, seed=0, batch_size=4000)
    params = aug.draw(4000, step=0)
    assert len(params) == 10
    blur_rates = [p["blur"].float().mean().item() for p in params]
    assert blur_rates[0] == 1.0 and abs(blur_rates[1] - 0.1) < 0.02
    assert all(abs(r - 0.5) < 0.03 for r in blur_rates[2:])
    solarize_rates = [p["solarize"].float().mean().item() for p in params]
    assert solarize_rates[0] == 0 and abs(solarize_rates[1] - 0.2) < 0.02 and max(solarize_rates[2:]) == 0
    for p in params:
        assert abs(p["jitter"].float().mean() - 0.8) < 0.02 and abs(p["gray"].float().mean() - 0.2) < 0.02
        assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0 and abs(p["sigma"].mean() - 1.05) < 0.03
        for name, (low, high) in augment.JITTER.items():
            f = p["factors"][name]
            assert low <= f.min() and f.max() <= high and abs(f.mean() - (low + high) / 2) < 0.02 * (high - low)
        first = torch.bincount(p["order"][:, 0], minlength=4).float() / 4000
        assert (first - 0.25).abs().max() < 0.03
        assert (p["order"].sort(dim=1).values == torch.arange(4)).all()  # permutations
    # The same (seed, step, micro-batch) gives the same draws; another step does not.
    assert torch.equal(aug.draw(8, step=1)[1]["sigma"], aug.draw(8, step=1)[1]["sigma"])
    assert not torch.equal(aug.draw(8, step=1)[1]["sigma"], aug.draw(8, step=2)[1]["sigma"])
    assert not torch.equal(aug.draw(8, step=1, micro=1)[1]["sigma"], aug.draw(8, step=1)[1]["sigma"])


def test_gpu_augment_independent_of_process_count():
    """Process r of W holds samples r, r + W, ... of the global batch and must get their parameters."""
    geometry = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8, photometric=False)
    random.seed(0)
    samples = [geometry(photo(i)) for i in range(8)]
    crops = [torch.stack(view) for view in zip(*samples)]
    whole = GPUAugmentDINO(geometry.views, geometry.sigma_scale, 0, batch_size=8)(crops, step=2)
    for rank in range(2):
        part = GPUAugmentDINO(geometry.views, geometry.sigma_scale, 0, 4, rank, 2)
        out = part([c[rank::2] for c in crops], step=2)
        for a, b in zip(out, whole):
            torch.testing.assert_close(a, b[rank::2])


def test_persistent_workers_see_the_epoch(tmp_path):
    for i in range(4):
        photo(i, (30, 26)).save(tmp_path / f"{i}.png")
    aug = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8)
    ds = ImageDataset(tmp_path, transform=aug, seed=0)

    def views(loader, epoch):
        ds.set_epoch(epoch)
        return [torch.cat([c.flatten() for c in crops]) for crops, _, _ in loader]

    persistent = build_loader(ds, batch_size=2, num_workers=1, shuffle=False)
    assert persistent.persistent_workers
    reference = build_loader(ds, batch_size=2, num_workers=0, shuffle=False)
    for epoch in (1, 2, 1):
        a, b = views(persistent, epoch), views(reference, epoch)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(views(reference, 1)[0], views(reference, 2)[0])


def view_statistics(views):
    """Per view kind (global 1, global 2, local): grey fraction, mean level, mean contrast, mean sharpness."""
    stats = []
    for kind in (slice(0, 1), slice(1, 2), slice(2, None)):
        crops = torch.stack([c for sample in views for c in sample[kind]]) * STD + MEAN
        grey = ((crops[:, 0] - crops[:, 1]).abs().amax(dim=(1, 2)) < 1e-3).float().mean()
        sharpness = (crops[..., 1:] - crops[..., :-1]).abs().mean()
        stats.append(torch.stack([grey, crops.mean(), crops.std(dim=(1, 2, 3)).mean(), sharpness]))
    return torch.stack(stats)


def test_view_statistics_match_the_original_on_real_images(shared_data):
    """200 imagenette images, 112 px global and 48 px local views: the CPU pipeline and --gpu_augment against the
    original chain. Tolerances are about 3.5 standard deviations of the difference between two runs."""
    files = sorted((shared_data / "imagenette-160" / "train").glob("*/*.JPEG"))[::40][:200]
    images = [Image.open(f).convert("RGB") for f in files]
    sizes = dict(global_size=112, local_size=48, local_crops_number=2)
    original, ours = OriginalAugmentation(**sizes), DataAugmentationDINO(**sizes)
    geometry = DataAugmentationDINO(**sizes, photometric=False)
    gpu = GPUAugmentDINO(geometry.views, geometry.sigma_scale, seed=0, batch_size=len(images))
    random.seed(0)
    torch.manual_seed(0)
    reference = view_statistics([original(im) for im in images])
    cpu = view_statistics([ours(im) for im in images])
    crops = [torch.stack(v) for v in zip(*[geometry(im) for im in images])]
    gpu_stats = view_statistics(list(zip(*gpu(crops, step=0))))
    for stats in (cpu, gpu_stats):
        assert (stats[:, 0] - reference[:, 0]).abs().max() < 0.14  # grey rate 0.2
        assert (stats[:, 1] - reference[:, 1]).abs().max() < 0.05  # mean level
        assert (stats[:, 2] - reference[:, 2]).abs().max() < 0.03  # contrast
        assert ((stats[:, 3] - reference[:, 3]).abs() / reference[:, 3]).max() < 0.15  # sharpness (blur)
    # The recipe's blur asymmetry: view 1 (always blurred) is smoother than view 2 (rarely), in every pipeline.
    assert all(s[0, 3] < 0.9 * s[1, 3] for s in (reference, cpu, gpu_stats))


def test_compile_covers_both_resolutions_without_recompiling():
    """Static graphs, one per crop side: two training steps compile each once and the second step reuses them."""
    from core.dino import DINOHead, MultiCropWrapper, compile_backbones
    from core.vision_transformer import VisionTransformer

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.ndim == 4))
        return gm.forward

    torch._dynamo.reset()
    def wrapper():
        vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
        return MultiCropWrapper(vit, DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8))

    student, teacher = wrapper(), wrapper()
    teacher.requires_grad_(False)
    compile_backbones(student, teacher, backend=counting_backend)
    counts = []
    for step in range(2):
        crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3
        with torch.no_grad():
            teacher(crops[:2])
        student(crops).sum().backward()
        counts.append(len(graphs))
    assert counts[0] == counts[1] and counts[0] >= 2
    assert {s for g in graphs for s in g} >= {(4, 3, 32, 32), (6, 3, 16, 16)}
    assert list(student.state_dict())[0].startswith("backbone.") and "_orig_mod" not in "".join(student.state_dict())
    torch._dynamo.reset()


def test_dino_loss_equals_pairwise_form():
    from core.dino import DINOLoss

    def pairwise(loss_fn, s, t, temp):
        student = (s / loss_fn.student_temp).chunk(loss_fn.ncrops)
        q = torch.softmax((t - loss_fn.center) / temp, dim=-1).chunk(len(t) // len(student[0]))
        terms = [(-qi * torch.log_softmax(sv, -1)).sum(-1).mean() for i, qi in enumerate(q)
                 for v, sv in enumerate(student) if v != i]
        return sum(terms) / len(terms)

    torch.manual_seed(0)
    for ncrops, n_teacher in ((10, 2), (2, 2), (3, 1)):
        loss_fn = DINOLoss(32, ncrops, 0.04, 0.04, 0, 1)
        loss_fn.center.normal_()
        s = torch.randn(ncrops * 5, 32, requires_grad=True)
        t = torch.randn(n_teacher * 5, 32)
        ours = loss_fn(s, t, 0)
        (grad_ours,) = torch.autograd.grad(ours, s)
        reference = pairwise(loss_fn, s, t, 0.04)
        (grad_reference,) = torch.autograd.grad(reference, s)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_ours, grad_reference, atol=1e-7, rtol=1e-4)


def test_foreach_clipping_equals_per_parameter_loop():
    from core.dino import clip_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    grads = [torch.randn_like(p) * s for p, s in zip(model.parameters(), (5.0, 0.1, 3.0, 0.2))]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    norms = clip_gradients(model, 1.0)
    for p, g, n in zip(model.parameters(), grads, norms):
        expected = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
        torch.testing.assert_close(p.grad, expected)
        assert n.item() == pytest.approx(g.norm().item(), rel=1e-6)


def test_auto_precision_is_bf16_where_supported(monkeypatch):
    from core.device import resolve_precision

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(cuda, "auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(cuda, "auto") == "fp16"
    assert resolve_precision(cuda, "fp16") == "fp16"
    assert resolve_precision(torch.device("cpu"), "auto") == "fp32"


def test_gpu_augment_without_kornia_is_a_user_error(monkeypatch):
    import importlib.util

    from core.errors import UserError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kornia" else find_spec(name, *a))
    with pytest.raises(UserError, match="pip install kornia"):
        GPUAugmentDINO(DataAugmentationDINO().views, 1.0)


def test_every_permutation_is_reachable():
    aug = GPUAugmentDINO(DataAugmentationDINO(local_crops_number=0).views, 1.0, seed=0, batch_size=2000)
    orders = {tuple(o) for o in aug.draw(2000, step=0)[0]["order"].tolist()}
    assert orders == set(itertools.permutations(range(4)))


def test_gpu_augment_run_resumes_exactly_and_skips_a_corrupt_jpeg(tmp_path):
    from test_main_dino import TINY, final_weights, make_images, run

    data = make_images(tmp_path / "data", 15)
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    argv = TINY + ["--gpu_augment", "true", "--data_path", str(data)]
    run(argv + ["--output_dir", str(tmp_path / "once")])
    run(argv + ["--output_dir", str(tmp_path / "twice")])
    shutil.copy(tmp_path / "twice" / "checkpoint0000.pth", tmp_path / "twice" / "checkpoint.pth")
    (tmp_path / "twice" / "log.txt").write_text((tmp_path / "twice" / "log.txt").read_text().splitlines()[0] + "\n")
    run(argv + ["--output_dir", str(tmp_path / "twice")])
    once, resumed = final_weights(tmp_path / "once"), final_weights(tmp_path / "twice")
    for key in ("student", "teacher", "dino_loss"):
        assert all(torch.equal(once[key][k], resumed[key][k]) for k in once[key]), key
    records = [json.loads(line) for line in (tmp_path / "once" / "log.txt").read_text().splitlines()]
    assert [r["train_skipped_images"] for r in records] == [1, 1]  # 16 files, all used every epoch
    assert (tmp_path / "once" / "log.txt").read_text() == (tmp_path / "twice" / "log.txt").read_text()


def cli_error(argv, capsys):
    from test_main_dino import run

    return one_line_error(lambda: run(argv), capsys)


def test_nonsensical_numbers_stop_before_training(tmp_path, capsys, monkeypatch):
    from test_main_dino import TINY, make_images

    import main_dino

    data = make_images(tmp_path / "data", 16)
    base = TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(main_dino, "build_models", lambda *a: pytest.fail("training was reached"))
    for flags, message in ((["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
                           (["--epochs", "-3"], "--epochs must be at least 1, got -3"),
                           (["--teacher_temp", "0"], "--teacher_temp must be a finite number > 0"),
                           (["--momentum_teacher", "1.5"], "--momentum_teacher must be between 0 and 1"),
                           (["--global_crops_scale", "0.6", "0.3"], "--global_crops_scale must be two numbers"),
                           (["--log_every", "0"], "--log_every must be at least 1")):
        assert message in cli_error(base + flags, capsys)
    monkeypatch.setattr(gpu_augment.importlib.util, "find_spec", lambda name: None)
    assert "pip install kornia" in cli_error(base + ["--gpu_augment", "true"], capsys)


def test_nan_loss_message_without_a_checkpoint_closes_the_bar_first(tmp_path, monkeypatch):
    from test_main_dino import TINY, make_images, run

    import main_dino
    from core.errors import UserError

    events = []

    class Recorded(main_dino.Progress):
        def close(self):
            events.append("closed")
            super().close()

    monkeypatch.setattr(main_dino, "Progress", Recorded)
    monkeypatch.setattr(main_dino.DINOLoss, "forward", lambda self, s, t, e: (s.sum() + t.sum()) * float("nan"))
    data = make_images(tmp_path / "data", 16)
    with pytest.raises(UserError, match=r"loss is nan at iteration 0 \(epoch 0\): stopped; no checkpoint had been "
                                        r"written yet") as e:
        run(TINY + ["--log_every", "5", "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    assert events == ["closed"] and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
