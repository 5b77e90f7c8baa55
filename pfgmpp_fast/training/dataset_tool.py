"""`python -m pfgmpp_fast dataset`: build a data set in the published format.

The output is what EDM's / PFGM++'s dataset_tool writes, so `train --data` here and the
published train.py read it alike: a zip (stored, not compressed) or a folder of uncompressed
PNGs named ``NNNNN/imgNNNNNNNN.png`` after the index of the source image (the first five
digits name the folder), and ``dataset.json`` = ``{"labels": [[name, label], ...]}`` (null
unless every image has a label). The sources are listed in dataset_sources.py.

``--resolution WxH`` resizes every image with Lanczos (Pillow) unless it already has that
size; ``--transform center-crop`` crops the largest centred square and resizes it;
``--transform center-crop-wide`` crops the centred rows of aspect W:H, resizes them to WxH
and centres them on a black WxW canvas, skipping images narrower than W or too short (their
index is then missing from the names, as in the published tool). Both transforms give RGB.
Every output image must be square, grey or RGB, with a power-of-two size, and all alike:
otherwise the error names the source file. The output is written to a temporary file or
folder and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Callable, Optional

import numpy as np

from pfgmpp_fast.training.dataset_sources import SOURCE_KINDS, open_source
from pfgmpp_fast.utils.cli_errors import UsageError, blame, check_output_path, command, int_at_least
from pfgmpp_fast.utils.io_utils import TMP_SUFFIX, atomic_write

__all__ = ["TRANSFORMS", "transform_image", "archive_name", "build_dataset", "add_arguments", "main"]

TRANSFORMS = ("center-crop", "center-crop-wide")


def _resize(image: np.ndarray, size: tuple) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def transform_image(image: np.ndarray, transform: Optional[str], size: Optional[tuple]) -> Optional[np.ndarray]:
    """``image`` (uint8 [H, W] or [H, W, 3]) after ``transform`` to ``size`` = (W, H) (the
    module docstring); None when center-crop-wide skips it."""
    height, width = image.shape[:2]
    if transform is None:
        return image if size is None or tuple(size) == (width, height) else _resize(image, tuple(size))
    out_w, out_h = size
    if transform == "center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resize(_rgb(image[top : top + side, left : left + side]), (out_w, out_h))
    if transform == "center-crop-wide":
        rows = int(np.round(out_w * height / width))
        if width < out_w or rows < out_h:
            return None
        top = (height - rows) // 2
        strip = _resize(_rgb(image[top : top + rows]), (out_w, out_h))
        canvas = np.zeros((out_w, out_w, 3), dtype=np.uint8)
        canvas[(out_w - out_h) // 2 : (out_w - out_h) // 2 + out_h] = strip
        return canvas
    raise ValueError(f"transform must be one of {TRANSFORMS} or None, got {transform!r}")


def archive_name(index: int) -> str:
    """The published name of the image of source index ``index``: ``NNNNN/imgNNNNNNNN.png``."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=0, optimize=False)
    return buffer.getvalue()


def _check_like_first(image: np.ndarray, name: str, first: Optional[tuple]) -> tuple:
    """The (width, height, channels) of ``image``; ValueError naming ``name`` if it breaks the rules."""
    attrs = (image.shape[1], image.shape[0], image.shape[2] if image.ndim == 3 else 1)
    if first is None:
        width, height, channels = attrs
        if width != height or channels not in (1, 3) or width & (width - 1):
            raise ValueError(
                f"{name}: the images must be square, grey or RGB, with a power-of-two size; this one is "
                f"{width}x{height} with {channels} channels (use --resolution WxH and --transform)"
            )
        return attrs
    if attrs != first[0]:
        raise ValueError(
            f"{name} is {attrs[0]}x{attrs[1]} with {attrs[2]} channels, but {first[1]} (the first image) "
            f"is {first[0][0]}x{first[0][1]} with {first[0][2]} channels: every image must be alike "
            "(give --resolution WxH to resize every image; --transform center-crop makes them RGB)"
        )
    return attrs


def _write_images(source, transform, size, put: Callable[[str, bytes], None], progress: bool) -> int:
    from tqdm import tqdm

    first, labels, written = None, [], 0
    items = tqdm(
        source.items, total=source.count, desc="images", unit="img", file=sys.stderr, disable=None if progress else True
    )
    for index, (name, image, label) in enumerate(items):
        image = transform_image(image, transform, size)
        if image is None:
            continue
        attrs = _check_like_first(image, name, first)
        first = first or (attrs, name)
        put(archive_name(index), _png(image))
        labels.append(None if label is None else [archive_name(index), label])
        written += 1
    if not written:
        raise ValueError(
            "no image was written (every source image was skipped by --transform center-crop-wide, "
            "or the source holds no images)"
        )
    put("dataset.json", json.dumps({"labels": labels if all(x is not None for x in labels) else None}).encode())
    return written


def _write_zip(dest: str, write_images: Callable) -> int:
    count = []

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf:
            count.append(write_images(zf.writestr))

    atomic_write(dest, write)
    return count[0]


def _write_folder(dest: str, write_images: Callable) -> int:
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(dest)) + ".", suffix=TMP_SUFFIX, dir=parent)

    def put(name, data):
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)

    try:
        count = write_images(put)
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked before)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def build_dataset(
    source: str,
    dest: str,
    transform: Optional[str] = None,
    resolution: Optional[tuple] = None,
    max_images: Optional[int] = None,
    progress: bool = False,
) -> int:
    """Write the data set of ``source`` to ``dest`` (a .zip, or a folder that does not exist or
    is empty) in the published format; returns the number of images written."""
    if transform is not None and resolution is None:
        raise ValueError(f"transform {transform} needs a resolution (WxH)")
    if transform == "center-crop-wide" and resolution[1] > resolution[0]:
        raise ValueError(f"center-crop-wide needs a height <= width, got {resolution[0]}x{resolution[1]}")
    if not str(dest).lower().endswith(".zip") and os.path.isdir(dest) and os.listdir(dest):
        raise ValueError(f"destination folder {dest} is not empty")
    src = open_source(source, max_images)
    write_images = lambda put: _write_images(src, transform, resolution, put, progress)  # noqa: E731
    return (_write_zip if str(dest).lower().endswith(".zip") else _write_folder)(dest, write_images)


# ----------------------------------------------------------------------------------------
# Command line


def _resolution(text: str) -> tuple:
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"must be WxH with positive integers, e.g. 32x32, got {text!r}")
    return int(match.group(1)), int(match.group(2))


_resolution.__name__ = "WxH"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, metavar="PATH", help=f"input: {SOURCE_KINDS}")
    p.add_argument("--dest", required=True, metavar="PATH", help="output .zip (or folder) in the published format")
    p.add_argument(
        "--max-images", type=int_at_least(1), default=None, metavar="INT", help="read at most this many source images"
    )
    p.add_argument("--transform", choices=TRANSFORMS, default=None, help="crop/resize mode (needs --resolution)")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="WxH", help="output resolution, e.g. 32x32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


@command
def main(args) -> int:
    if not args.dest:
        raise UsageError("--dest", "must name an output .zip or folder")
    if args.transform is not None and args.resolution is None:
        raise UsageError("--transform", f"{args.transform} needs --resolution WxH")
    if args.transform == "center-crop-wide" and args.resolution[1] > args.resolution[0]:
        raise UsageError(
            "--resolution", f"center-crop-wide needs a height <= width, got {args.resolution[0]}x{args.resolution[1]}"
        )
    is_zip = args.dest.lower().endswith(".zip")
    check_output_path("--dest", args.dest, is_dir=not is_zip)
    if not is_zip and os.path.isdir(args.dest) and os.listdir(args.dest):
        raise UsageError("--dest", f"the folder {args.dest} is not empty")
    if args.source != "digits" and not os.path.exists(args.source):
        raise UsageError("--source", f"no such file or folder {args.source!r} (expected {SOURCE_KINDS})")
    with blame("--source"):  # what the source holds: a corrupt or odd image names its file
        count = build_dataset(args.source, args.dest, args.transform, args.resolution, args.max_images, args.progress)
    print(f"wrote {count} images to {args.dest}", file=sys.stderr)
    return 0
