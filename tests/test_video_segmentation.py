import csv
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_video_segmentation as evs
from conftest import read_scalars
from core.config import parse_args
from core.errors import UserError, run_cli
from core.video_segmentation import (LabelPropagation, boundary_f_measure, confusion_matrix, davis_palette,
                                     davis_statistics, frame_size, neighbourhood_mask, object_scores,
                                     read_object_mask, region_similarity, semantic_scores)


def run(argv):
    return run_cli(lambda: evs.main(parse_args(evs.get_args_parser(), "eval_video_segmentation", argv)))


def test_davis_palette_known_colours():
    """The PASCAL VOC / DAVIS colours every DAVIS annotation carries: background black, object 1 dark red, object 2
    dark green, 3 olive, 4 navy, 8 (64, 0, 0), and 255 the void colour (224, 224, 192)."""
    palette = davis_palette()
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
                8: (64, 0, 0), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour
    assert len({tuple(c) for c in palette}) == 256


def test_frame_size_as_the_original():
    assert frame_size(480, 854) == (480, 832)  # DAVIS 480p: 854 * 480 / 480 floored to 64
    assert frame_size(854, 480) == (832, 480)  # portrait
    assert frame_size(360, 480) == (480, 640)  # CamVid: upscaled to short side 480
    assert frame_size(480, 854, short_side=128) == (128, 192)


def test_neighbourhood_mask_equals_direct_loop():
    for h, w, r in ((5, 7, 2), (4, 3, 1), (3, 4, 5)):
        loop = torch.zeros(h, w, h, w, dtype=torch.bool)
        for i in range(h):
            for j in range(w):
                for p in range(h):
                    for q in range(w):
                        loop[i, j, p, q] = abs(i - p) <= r and abs(j - q) <= r
        assert torch.equal(neighbourhood_mask(h, w, r), loop.reshape(h * w, h * w))


def original_propagation(frames, first_labels, grid, n_last, topk, radius):
    """Independent float64 reference of the original's per-frame computation: full exp(cos / 0.1) affinity to every
    context patch, zeroed outside the window, top-k along the sources, normalised, labels mixed; the queue a list."""
    h, w = grid
    pos = [(i, j) for i in range(h) for j in range(w)]
    window = torch.tensor([[float(radius <= 0 or (abs(a - c) <= radius and abs(b - d) <= radius)) for (c, d) in pos]
                           for (a, b) in pos], dtype=torch.float64)
    first = F.normalize(frames[0].double(), dim=1)
    queue, outputs = [], []
    for target in frames[1:]:
        target = F.normalize(target.double(), dim=1)
        feats = [first] + [f for f, _ in queue]
        labels = [first_labels.double()] + [s for _, s in queue]
        aff = torch.cat([torch.exp(target @ f.T / 0.1) * window for f in feats], dim=1)  # targets x sources
        kth = aff.topk(topk, dim=1).values[:, -1:]
        aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
        aff = aff / aff.sum(dim=1, keepdim=True)
        out = aff @ torch.cat(labels)
        queue = (queue + [(target, out)])[-n_last:] if n_last else []
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("grid, n_last, topk, radius", [((4, 5), 2, 3, 1), ((4, 5), 0, 1, 2), ((4, 5), 3, 4, 3),
                                                        ((9, 3), 2, 3, 1), ((6, 11), 7, 5, 2), ((5, 5), 1, 5, 0)])
def test_propagation_equals_original_algorithm(grid, n_last, topk, radius):
    """Wide and tall grids, several bands of lines, no window (radius 0), a queue shorter than the video."""
    torch.manual_seed(0)
    dim, channels, n = 8, 3, grid[0] * grid[1]
    frames = [F.normalize(torch.randn(n, dim), dim=1) for _ in range(10)]
    first_labels = F.one_hot(torch.randint(0, channels, (n,)), channels).float()
    propagate = LabelPropagation(frames[0], first_labels, grid, n_last, topk, radius)
    got = [propagate(f) for f in frames[1:]]
    expected = original_propagation(frames, first_labels, grid, n_last, topk, radius)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_topk_larger_than_window_is_refused():
    with pytest.raises(UserError, match="--topk 10 exceeds the 4 patches"):
        LabelPropagation(torch.randn(20, 4), torch.ones(20, 2), (4, 5), topk=10, radius=1)


def staircase():
    """A: columns 0..19 of a 40x40 image. B: columns 0..19 in rows 0..19 and 0..24 in rows 20..39 (A inside B)."""
    a = np.zeros((40, 40), bool)
    a[:, :20] = True
    b = a.copy()
    b[20:, :25] = True
    return a, b


def test_region_similarity_by_hand():
    a, b = staircase()
    assert region_similarity(a, a) == 1.0
    assert region_similarity(a, b) == pytest.approx(800 / 900)  # A inside B: |A| / |B|
    assert region_similarity(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty
    square, shifted = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    square[10:20, 10:20], shifted[10:20, 13:23] = True, True
    assert region_similarity(square, shifted) == pytest.approx(70 / 130)  # 7x10 overlap, 100 + 100 - 70 union


def test_boundary_f_measure_by_hand():
    """Tolerance on a 40x40 image: ceil(0.008 * 56.6) = 1 pixel. A's boundary: column 19 (40 px). B's: column 19 in
    rows 0..19, row 19 in columns 20..24 (the step) and column 24 in rows 20..39 (45 px). Matched within 1 px:
    21 of B's (column 19 top and (19, 20)), 21 of A's (rows 0..20). F = 2 * 21 / (45 + 40)."""
    a, b = staircase()
    assert boundary_f_measure(a, a) == 1.0
    assert boundary_f_measure(a, b) == pytest.approx(42 / 85)
    assert boundary_f_measure(b, a) == pytest.approx(42 / 85)
    # A tolerance of 5 pixels (a value >= 1 is taken in pixels) matches every boundary pixel.
    assert boundary_f_measure(a, b, bound_th=5) == 1.0
    empty = np.zeros_like(a)
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(a, empty) == 0.0 and boundary_f_measure(empty, a) == 0.0


def brute_force_f(gt, pred, radius):
    """Boundary by the definition (a pixel differs from its right, lower or lower-right neighbour, with the
    davis2017 edge rules), matching by Euclidean distance to the nearest boundary pixel of the other mask."""
    def boundary(m):
        h, w = m.shape
        out = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                if y == h - 1 and x == w - 1:
                    continue
                neighbours = [(y, x + 1)] if y == h - 1 else [(y + 1, x)] if x == w - 1 else \
                    [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
                out[y, x] = any(m[p] != m[y, x] for p in neighbours)
        return np.argwhere(out)

    def matched(src, dst):
        return sum(bool(len(dst)) and np.min(np.hypot(*(dst - p).T)) <= radius for p in src)

    pb, gb = boundary(pred), boundary(gt)
    precision, recall = matched(pb, gb) / len(pb), matched(gb, pb) / len(gb)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_measure_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(3):
        blobs = [np.kron(rng.random((6, 8)) > 0.5, np.ones((4, 4), bool))[:23, :29] for _ in range(2)]
        gt, pred = (b ^ (rng.random(b.shape) < 0.05) for b in blobs)  # blocky shapes with stray pixels, odd borders
        for radius in (1, 2, 3):
            assert boundary_f_measure(gt, pred, bound_th=radius) == pytest.approx(brute_force_f(gt, pred, radius))


def test_davis_statistics_by_hand():
    """8 frames: quarters per davis2017 are frames 0-2 and 5-7 (first and last); decay 0.8 - 0.3."""
    mean, recall, decay = davis_statistics([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert mean == pytest.approx(0.55)
    assert recall == pytest.approx(0.5)  # 0.5 itself is not above the threshold
    assert decay == pytest.approx(0.5)
    # 7 frames: the quarter bounds round 2.5 and 5.5 up, so the quarters are frames 0-2 and 5-6.
    assert davis_statistics([1.0, 0.9, 0.3, 0.5, 0.4, 0.6, 0.0])[2] == pytest.approx(2.2 / 3 - 0.3)
    assert all(math.isnan(v) for v in davis_statistics([]))


def test_both_mask_formats_read_and_score_alike(tmp_path):
    ids = np.zeros((30, 40), np.uint8)
    ids[5:15, 5:20], ids[18:28, 22:38], ids[0, 0] = 1, 2, 255  # 255: void, read as background as davis2017 does
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette(davis_palette().ravel().tolist())
    palette.save(tmp_path / "2017.png")
    Image.fromarray(np.where(ids == 1, 255, 0).astype(np.uint8), mode="L").save(tmp_path / "2016.png")
    read_2017, read_2016 = read_object_mask(tmp_path / "2017.png"), read_object_mask(tmp_path / "2016.png")
    assert set(np.unique(read_2017)) == {0, 1, 2} and read_2017[0, 0] == 0
    assert np.array_equal(read_2016, (ids == 1).astype(np.uint8))
    shifted = np.roll(read_2017, 3, axis=1)
    j2017, f2017 = object_scores(read_2017, shifted, 2)
    j2016, f2016 = object_scores(read_2016, np.roll(read_2016, 3, axis=1), 1)
    assert j2017[0] == j2016[0] == pytest.approx(12 * 10 / (18 * 10))  # 15-wide box shifted by 3
    assert j2017[1] == pytest.approx(13 * 10 / (19 * 10))
    assert f2017[0] == f2016[0] < 1
    assert object_scores(read_2017, read_2017, 2) == ([1.0, 1.0], [1.0, 1.0])


def test_semantic_scores_by_hand():
    """gt / pred over 3 classes, ignore id 3 (index 3 = outside the classes):
    gt   0 0 1 1 2 2 3     confusion rows gt, cols pred: [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    pred 0 1 1 1 2 0 2     IoU 0: 1 / (2 + 2 - 1); 1: 2 / (2 + 3 - 2); 2: 1 / (2 + 1 - 1)."""
    gt = np.array([[0, 0, 1, 1, 2, 2, 3]])
    pred = np.array([[0, 1, 1, 1, 2, 0, 2]])
    confusion = confusion_matrix(gt, pred, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou, miou, accuracy = semantic_scores(confusion)
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert accuracy == pytest.approx(4 / 6)
    iou, miou, _ = semantic_scores(np.array([[2, 0], [0, 0]]))  # class 1 absent and never predicted: left out
    assert iou[0] == 1.0 and math.isnan(iou[1]) and miou == 1.0


def copy_davis(shared_data, root, sequences, frames):
    for seq in sequences:
        for kind, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".png")):
            (root / kind / "480p" / seq).mkdir(parents=True)
            for i in range(frames):
                shutil.copy(shared_data / "davis2016" / kind / "480p" / seq / f"{i:05d}{suffix}",
                            root / kind / "480p" / seq)
    return root


def test_davis_propagation_on_real_sequence(shared_data, tmp_path):
    data = copy_davis(shared_data, tmp_path / "davis", ["blackswan", "dog"], 4)
    (data / "ImageSets" / "2017").mkdir(parents=True)
    (data / "ImageSets" / "2017" / "val.txt").write_text("blackswan\n")  # the listing wins over the folders
    out = tmp_path / "out"
    overall = run(["--data_path", str(data), "--output_dir", str(out), "--arch", "vit_tiny", "--short_side", "128",
                   "--device", "cpu", "--bs", "3"])
    expected = ["blackswan", "global_results-val.csv", "per-sequence_results-val.csv"]
    assert sorted(p.name for p in out.iterdir()) == expected
    written = sorted((out / "blackswan").iterdir())
    assert [p.name for p in written] == [f"{i:05d}.png" for i in range(4)]
    for path in written:
        with Image.open(path) as im:
            assert im.mode == "P" and im.size == (854, 480)
            assert np.array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), davis_palette())
            assert set(np.unique(np.array(im))) <= {0, 1}
    first = np.array(Image.open(written[0]))
    assert np.array_equal(first, read_object_mask(data / "Annotations" / "480p" / "blackswan" / "00000.png"))
    with open(out / "per-sequence_results-val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["Sequence"] for r in rows] == ["blackswan_1"]
    # Frames 1 and 2 are scored, from the written files as davis2017-evaluation reads them; the last is left out.
    scores = [object_scores(read_object_mask(data / f"Annotations/480p/blackswan/{i:05d}.png"),
                            np.array(Image.open(written[i])), 1) for i in (1, 2)]
    assert float(rows[0]["J-Mean"]) == pytest.approx(np.mean([j[0] for j, _ in scores]), abs=1e-5)
    assert float(rows[0]["F-Mean"]) == pytest.approx(np.mean([f[0] for _, f in scores]), abs=1e-5)
    assert overall["J-Mean"] == pytest.approx(float(rows[0]["J-Mean"]), abs=1e-5)
    assert overall["J&F-Mean"] == pytest.approx((overall["J-Mean"] + overall["F-Mean"]) / 2)


def copy_camvid(shared_data, root, frames):
    source = shared_data / "camvid-seq"
    run_dir = root / "0001TP"
    for kind in ("rgb", "semantic"):
        (run_dir / kind).mkdir(parents=True)
        for path in sorted((source / "0001TP" / kind).glob("*.png"))[:frames]:
            shutil.copy(path, run_dir / kind)
    shutil.copy(source / "classes.txt", root)
    return run_dir


def test_semantic_propagation_on_camvid(shared_data, tmp_path):
    run_dir = copy_camvid(shared_data, tmp_path / "camvid", 4)
    out = tmp_path / "out"
    scores = run(["--task", "semantic", "--data_path", str(tmp_path / "camvid"), "--output_dir", str(out),
                  "--arch", "vit_tiny", "--short_side", "96", "--device", "cpu", "--label_every", "2",
                  "--log_dir", str(tmp_path / "tb")])
    stems = [p.stem for p in sorted((run_dir / "rgb").glob("*.png"))]
    predicted = [stems[1], stems[3]]  # frames 0 and 2 are references
    assert sorted(p.stem for p in (out / "0001TP").glob("*.png")) == predicted
    labelled_pixels = 0
    for stem in predicted:
        with Image.open(out / "0001TP" / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (480, 360)
            assert np.array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), davis_palette())
            assert set(np.unique(np.array(im))) <= set(range(11))  # classes 0..10, never the void id 11
        for kind in ("overlay", "error"):
            with Image.open(out / "0001TP" / kind / f"{stem}.png") as im:
                assert im.mode == "RGB" and im.size == (480, 360)
        labelled_pixels += int((np.array(Image.open(run_dir / "semantic" / f"{stem}.png")) != 11).sum())
    with open(out / "confusion_matrix.csv") as f:
        matrix = [list(map(int, row[1:])) for row in list(csv.reader(f))[1:]]
    assert len(matrix) == 11 and sum(map(sum, matrix)) == labelled_pixels
    iou, miou, accuracy = semantic_scores(np.array(matrix))
    assert scores["mIoU"] == pytest.approx(miou) and scores["pixel_accuracy"] == pytest.approx(accuracy)
    assert 0 < accuracy <= 1
    logged = read_scalars(tmp_path / "tb")
    assert logged["mIoU"] == [(0, pytest.approx(miou))] and logged["pixel_accuracy"] == [(0, pytest.approx(accuracy))]
    assert len([tag for tag in logged if tag.startswith("IoU/")]) == 11


def expect_error(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(shared_data, tmp_path, capsys):
    data = copy_davis(shared_data, tmp_path / "davis", ["blackswan"], 3)
    bad_mask = data / "Annotations" / "480p" / "blackswan" / "00001.png"
    Image.open(bad_mask).resize((427, 240)).save(bad_mask)
    out = tmp_path / "out"
    common = ["--output_dir", str(out), "--arch", "vit_tiny", "--short_side", "64", "--device", "cpu"]
    expect_error(["--data_path", str(data), *common], capsys, str(bad_mask), "427x240", "854x480")
    assert not any(out.iterdir())

    camvid = tmp_path / "camvid"
    run_dir = copy_camvid(shared_data, camvid, 3)
    first_label = sorted((run_dir / "semantic").glob("*.png"))[0]
    saved = first_label.read_bytes()
    first_label.unlink()
    expect_error(["--task", "semantic", "--data_path", str(camvid), *common], capsys, str(first_label),
                 "--label_every")
    first_label.write_bytes(saved)
    other = sorted((run_dir / "semantic").glob("*.png"))[2]
    labels = np.array(Image.open(other))
    labels[0, 0] = 42
    Image.fromarray(labels).save(other)
    expect_error(["--task", "semantic", "--data_path", str(camvid), *common], capsys, str(other), "class id 42",
                 "classes.txt")
    assert not any(out.iterdir())


def test_interrupted_sequence_leaves_no_output(shared_data, tmp_path, monkeypatch):
    data = copy_davis(shared_data, tmp_path / "davis", ["blackswan"], 3)
    out = tmp_path / "out"
    calls = []

    def failing_save(path, array, palette):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")

    monkeypatch.setattr(evs, "save_indexed_png", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        run(["--data_path", str(data), "--output_dir", str(out), "--arch", "vit_tiny", "--short_side", "64",
             "--device", "cpu"])
    assert list(out.iterdir()) == []


def test_checkpoint_backbone_gives_the_same_masks_as_that_backbone(shared_data, tmp_path):
    """A DINO-layout checkpoint (teacher, backbone. prefix, a head to drop) of the seed-0 random vit_tiny propagates
    exactly as the seed-0 random backbone itself."""
    from core.vision_transformer import build_vit

    data = copy_davis(shared_data, tmp_path / "davis", ["dog"], 3)
    torch.manual_seed(0)
    state = {f"backbone.{k}": v for k, v in build_vit("vit_tiny", 16).state_dict().items()}
    state["head.last_layer.weight"] = torch.zeros(4, 8)
    torch.save({"teacher": state, "epoch": 1}, tmp_path / "checkpoint.pth")
    common = ["--data_path", str(data), "--short_side", "96", "--device", "cpu", "--seed", "0"]
    run([*common, "--output_dir", str(tmp_path / "random"), "--arch", "vit_tiny"])
    run([*common, "--output_dir", str(tmp_path / "loaded"), "--pretrained_weights", str(tmp_path / "checkpoint.pth")])
    for i in (1, 2):
        random_mask, loaded_mask = (np.array(Image.open(tmp_path / d / "dog" / f"{i:05d}.png"))
                                    for d in ("random", "loaded"))
        assert np.array_equal(random_mask, loaded_mask)
