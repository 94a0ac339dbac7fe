"""Videos as streams of RGB frames: read from a video file or a folder of frame images, written with PyAV, one frame
at a time, so that memory holds one frame whatever the length of the video."""
import contextlib
import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# mp4: H.264 where this FFmpeg build has an encoder for it, else MPEG-4 part 2 (the original's MP4V); avi: XVID's codec.
CODECS = {"mp4": ("libx264", "mpeg4"), "avi": ("mpeg4",)}
FORMATS = tuple(CODECS)


def read_frames(path, pattern="*"):
    """(frames per second, or None for a folder; iterator of (name, H x W x 3 uint8 RGB array)).

    A file is opened and checked here, before the caller writes anything; frames are decoded only as they are asked
    for. A folder's images matching pattern are taken in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no {pattern} image ({', '.join(IMAGE_SUFFIXES)}): give a video file or a "
                            f"folder of frames")
        return None, ((f.stem, read_image(f)) for f in files)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a video file or a folder of frames")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise UserError(f"cannot decode video {path} ({type(e).__name__}): is it a video file? Re-encode it, or "
                        f"extract its frames to a folder") from e
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} has no video stream: give a video file or a folder of frames")
    rate = container.streams.video[0].average_rate
    return (float(rate) if rate else None), decode(container, path)


def decode(container, path):
    count = 0
    with container:
        try:
            for frame in container.decode(video=0):
                yield f"frame-{count:04d}", frame.to_ndarray(format="rgb24")
                count += 1
        except av.FFmpegError as e:
            raise UserError(f"video {path} cannot be decoded after frame {count} ({type(e).__name__}): the file is "
                            f"damaged; re-encode it or extract its frames to a folder") from e
    if not count:
        raise UserError(f"video {path} has no decodable frame: the file is damaged or empty")


def read_image(path):
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except OSError as e:
        raise UserError(f"cannot decode frame {path} ({type(e).__name__}): replace or remove the file") from e


def pick_codec(video_format):
    for name in CODECS[video_format]:
        try:
            av.Codec(name, "w")
            return name
        except av.FFmpegError:
            continue
    raise UserError(f"this PyAV build has no {video_format} video encoder: reinstall PyAV (`pip install av`)")


class VideoWriter:
    """A video written frame by frame to a hidden file in the target folder and renamed when the `with` block ends
    without error; on an error the partial file is deleted, so a video under the target name is always complete.

    The frame size is the first frame's (cropped to even sides, as 4:2:0 chroma needs); later frames are resized to
    it."""

    def __init__(self, path, fps=30.0, video_format="mp4"):
        if video_format not in CODECS:
            raise UserError(f"unknown video format '{video_format}': choose {' or '.join(FORMATS)}")
        self.path, self.fps, self.format, self.codec = Path(path), fps, video_format, pick_codec(video_format)
        self.container = self.stream = None
        self.tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        self.frames = 0

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # mode 0666 as any open(): the umask decides (mkstemp's 0600 would hide the video from colleagues)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror}): choose a writable output folder") from e
        try:
            self.container = av.open(str(self.tmp), "w", format=self.format)
        except BaseException:
            os.remove(self.tmp)
            raise
        return self

    def write(self, rgb):
        if self.stream is None:
            height, width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
            if not height or not width:
                raise UserError(f"frames of {rgb.shape[1]}x{rgb.shape[0]} pixels are too small for a video")
            self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            if self.codec == "libx264":
                self.stream.options = {"crf": "18"}
            else:
                self.stream.bit_rate = 8_000_000
        size = (self.stream.width, self.stream.height)
        if (rgb.shape[1], rgb.shape[0]) != size:
            rgb = rgb[:size[1], :size[0]] if rgb.shape[0] - size[1] in (0, 1) and rgb.shape[1] - size[0] in (0, 1) \
                else np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if not self.frames:
                    raise UserError(f"no frame to write to {self.path}: the input had none")
                self.container.mux(self.stream.encode(None))
                self.container.close()
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):  # anything short of success: the partial file goes
                with contextlib.suppress(Exception):
                    self.container.close()
                os.remove(self.tmp)
        return False
