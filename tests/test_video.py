"""Videos: frames written with our writer decode back (count, size, colour); folders of frames; video_generation.py
end to end; a video that cannot be decoded stops with `error:` and leaves no output behind."""
import numpy as np
import pytest
import torch
from PIL import Image

import video_generation
from core.errors import UserError, run_cli
from core.video import VideoWriter, read_frames

COLOURS = [(200 - 25 * i, 40 + 20 * i, 100 + (-1) ** i * 60) for i in range(7)]


def write_video(path, fps=30.0, video_format="mp4", size=(48, 64)):
    with VideoWriter(path, fps, video_format) as writer:
        for colour in COLOURS:
            writer.write(np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy())
    return path


@pytest.mark.parametrize("video_format,fps", [("mp4", 30.0), ("avi", 29.97)])
def test_written_video_decodes_back(tmp_path, video_format, fps):
    path = write_video(tmp_path / f"clip.{video_format}", fps, video_format)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed, nothing else left
    rate, frames = read_frames(path)
    frames = list(frames)
    assert rate == pytest.approx(fps, rel=1e-3)
    assert [name for name, _ in frames] == [f"frame-{i:04d}" for i in range(7)]
    for (_, rgb), colour in zip(frames, COLOURS):
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        assert np.abs(rgb.reshape(-1, 3).mean(0) - colour).max() < 8  # lossy codec, flat colour


def test_odd_and_mixed_frame_sizes(tmp_path):
    """4:2:0 needs even sides: a 65x49 first frame sets a 64x48 video; a frame of another size is resized to it."""
    with VideoWriter(tmp_path / "odd.mp4") as writer:
        writer.write(np.full((49, 65, 3), 90, np.uint8))
        writer.write(np.full((100, 30, 3), 90, np.uint8))
    frames = list(read_frames(tmp_path / "odd.mp4")[1])
    assert [rgb.shape for _, rgb in frames] == [(48, 64, 3)] * 2
    with pytest.raises(UserError, match="no frame"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]


def test_folder_of_frames(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"{i:02d}": rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) for i in (3, 0, 11, 7)}
    for name, rgb in images.items():
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    rate, frames = read_frames(tmp_path)
    frames = list(frames)
    assert rate is None
    assert [name for name, _ in frames] == ["00", "03", "07", "11"]
    assert all(np.array_equal(rgb, images[name]) for name, rgb in frames)


def generate(tmp_path, *argv):
    torch.manual_seed(0)
    return video_generation.main(video_generation.get_args_parser().parse_args(
        ["--arch", "vit_tiny", "--patch_size", "8", "--device", "cpu", *argv]))


def test_video_generation_end_to_end(tmp_path):
    """7 frames of 64x48 -> a 7-frame video of 64x48 and 7 attention pictures; --video_only remakes the video from
    them; a folder of frames with --resize 24 (short side) gives 32x24 frames."""
    clip = write_video(tmp_path / "clip.mp4", fps=12.0)
    out = tmp_path / "out"
    video = generate(tmp_path, "--input_path", str(clip), "--output_path", str(out))
    rate, frames = read_frames(video)
    frames = list(frames)
    assert video == out / "video.mp4" and rate == 12.0  # the input's rate wins over --fps, as in the original
    assert len(frames) == 7 and all(rgb.shape == (48, 64, 3) for _, rgb in frames)
    pictures = sorted((out / "attention").iterdir())
    assert [p.name for p in pictures] == [f"attn-frame-{i:04d}.jpg" for i in range(7)]
    assert all(Image.open(p).size == (64, 48) for p in pictures)
    assert sorted(p.name for p in out.iterdir()) == ["attention", "video.mp4"]  # no staging folder left

    again = generate(tmp_path, "--input_path", str(out / "attention"), "--output_path", str(tmp_path / "again"),
                     "--video_only", "--video_format", "avi", "--fps", "5")
    rate, frames = read_frames(again)
    assert rate == 5.0 and len(list(frames)) == 7

    folder = tmp_path / "frames"
    folder.mkdir()
    for name, rgb in read_frames(clip)[1]:
        Image.fromarray(rgb).save(folder / f"{name}.jpg")
    resized = generate(tmp_path, "--input_path", str(folder), "--output_path", str(tmp_path / "resized"),
                       "--resize", "24")
    rate, frames = read_frames(resized)
    frames = list(frames)
    assert rate == 30.0 and len(frames) == 7 and all(rgb.shape == (24, 32, 3) for _, rgb in frames)


def test_corrupt_video_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    parser = video_generation.get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: video_generation.main(parser.parse_args(["--input_path", str(bad), "--output_path",
                                                                 str(out), "--arch", "vit_tiny"])))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
    assert not out.exists()

    truncated = tmp_path / "truncated.mp4"  # an mp4 cut short loses its index: undecodable as well
    truncated.write_bytes(write_video(tmp_path / "good.mp4").read_bytes()[:600])
    with pytest.raises(UserError, match="truncated.mp4"):
        generate(tmp_path, "--input_path", str(truncated), "--output_path", str(out))
    assert not out.exists()


def test_failure_mid_stream_leaves_no_video(tmp_path):
    """A frame that cannot be decoded after three good ones: the error names it, and neither the partial video nor
    attention pictures of the unfinished run are left."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 24, 3), 40 * i, np.uint8)).save(folder / f"f{i}.png")
    (folder / "f3.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="f3.png"):
        generate(tmp_path, "--input_path", str(folder), "--output_path", str(out))
    assert list(out.iterdir()) == []
