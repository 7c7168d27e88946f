"""TADiSR Load Image from Folder, the logic: one image per queued run, for batch upscaling through the queue.

A relative folder is looked up inside ComfyUI's input folder and may not climb out of it with
`..`; an absolute folder is taken as it is (users batch their own archives). Files are served in
natural order (img2 before img10); the index wraps around after the last image, or, with
`when_done = "stop"`, the run fails with a clear "done" message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter

import torch

from . import host

log = logging.getLogger("tadisr")
WHEN_DONE = ("wrap around", "stop")
_told: set[tuple[str, int]] = set()   # (folder, count) whose left-out outputs were logged: once, not every run


def resolve_folder(folder: str) -> str:
    """The folder's full path; ValueError if a relative one escapes the input folder or it does not exist."""
    folder = (folder or "").strip()
    if os.path.isabs(folder):
        path = os.path.normpath(folder)
    else:
        rel = os.path.normpath(folder) if folder else "."
        if rel == ".." or rel.startswith(".." + os.sep):
            raise ValueError(f"TADiSR: folder '{folder}' points outside ComfyUI's input folder; give a folder "
                             "inside it, or an absolute path")
        path = os.path.join(host.input_directory(), rel)
    if os.path.isfile(path):
        raise ValueError(f"TADiSR: image folder '{folder}' is a file ({path}), not a folder; give the folder that "
                         "holds it (Load Image reads a single file)")
    if not os.path.isdir(path):
        raise ValueError(f"TADiSR: image folder '{folder}' not found (looked for {path}); give a folder inside "
                         "ComfyUI's input folder or an absolute path")
    return path


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: img2 < img10 (case-insensitive otherwise)."""
    # isdecimal, not isdigit: "²" is a digit that int() refuses, and re's \d matches decimals only
    return [(0, int(part), part) if part.isdecimal() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def list_images(folder: str) -> list[str]:
    """Image file names directly inside `folder`, in natural order: the files the CLI takes from it
    (`images.walk_images`: the picture formats Pillow reads; hidden names such as a Mac's `._a.png` left out; so are
    our outputs, `batch.output_files`, with a warning, so earlier results are not served)."""
    from tadisr_core.batch import OUTPUT_PATTERNS, output_files
    from tadisr_core.images import walk_images

    files = walk_images(folder, recursive=False).files
    outputs = set(output_files(files))
    if outputs and (folder, len(outputs)) not in _told:
        _told.add((folder, len(outputs)))
        log.warning("TADiSR: %s: left out %d file(s) named like TADiSR outputs (%s); rename them to upscale them",
                    folder, len(outputs), OUTPUT_PATTERNS)
    return sorted((p.name for p in files if p not in outputs), key=natural_key)


def pick(index: int, count: int, when_done: str, folder: str) -> int:
    """The position served for widget value `index`: wrapped, or ValueError("done") past the end."""
    if when_done not in WHEN_DONE:
        raise ValueError(f"TADiSR: when_done must be one of {WHEN_DONE}, got '{when_done}'")
    if index < 0:
        raise ValueError(f"TADiSR: index must be >= 0, got {index}")
    if index < count:
        return index
    if when_done == "stop":
        raise ValueError(f"TADiSR: done: all {count} images of {folder} were served (index {index}). "
                         "Set index to 0 to start again.")
    return index % count


def read_image(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file as (IMAGE [1, H, W, 3], MASK [1, H, W]) float 0..1, as ComfyUI's Load Image gives
    them: the image RGB (EXIF orientation applied, gray spread to RGB), the mask 1 - alpha (transparency
    keys included, `images.read_image`), all zeros when the file has no alpha."""
    from tadisr_core.images import load_image

    image = load_image(path)
    mask = 1 - image[:, 3] if image.shape[1] == 4 else image.new_zeros(1, *image.shape[-2:])
    rgb = image[:, :3].expand(-1, 3, -1, -1).movedim(1, -1).contiguous()
    return rgb, mask.contiguous()


def chosen_file(folder: str, index: int, when_done: str = "wrap around") -> tuple[str, str, list[str]]:
    """(folder path, file name, every image name of the folder) of the file served for `index`."""
    path = resolve_folder(folder)
    names = list_images(path)
    if not names:
        from tadisr_core.images import IMAGE_SUFFIXES, left_out_advice, walk_images

        advice = left_out_advice(walk_images(path, recursive=False).others)
        raise ValueError(f"TADiSR: no images ({', '.join(sorted(IMAGE_SUFFIXES))} or another picture format "
                         f"Pillow reads; files named like outputs left out) in {path}{advice}")
    return path, names[pick(int(index), len(names), when_done, path)], names


def output_stem(name: str, names: list[str]) -> str:
    """The output name of image file `name` of a folder listing `names`: its stem, with the suffix kept
    (`page_jpg`) when another image has the same stem, and `-2`, `-3` in listing order when that name is
    taken too; names are compared ignoring case, as some file systems do. One name per file, so each
    output can be traced to its file.

    Not the CLI's naming (`batch.plan_jobs`: `page.jpg` -> `page`, `page.png` -> `page-2`), on purpose: the
    CLI keeps names stable across runs by reading the input recorded in its earlier outputs, which ComfyUI's
    Save Image (`prefix_00001_.png`) neither writes nor finds; here the suffix shows at a glance which file an
    output came from, from the listing alone."""
    shared = Counter(os.path.splitext(other)[0].casefold() for other in names)
    taken: set[str] = set()
    for other in names:
        stem, suffix = os.path.splitext(other)
        base = stem if shared[stem.casefold()] == 1 else f"{stem}_{suffix.lstrip('.')}"
        out, k = base, 2
        while out.casefold() in taken:
            out, k = f"{base}-{k}", k + 1
        taken.add(out.casefold())
        if other == name:
            return out
    raise ValueError(f"{name} is not in the folder's listing")


def fingerprint(folder: str | None, index: int | None, when_done: str = "wrap around") -> str | float:
    """Changes when the served file or its contents change, or the folder's listing does (the `count` and
    the output names come from it). NaN (never equal: always re-run) when it cannot be resolved, or when
    `folder` or `index` comes from another node: ComfyUI passes None for a linked input then."""
    if not isinstance(folder, str) or not isinstance(index, int):
        return float("nan")
    try:
        path, name, names = chosen_file(folder, index, when_done)
        listing = hashlib.sha1("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        return f"{name}:{os.path.getmtime(os.path.join(path, name))}:{len(names)}:{listing}"
    except (ValueError, OSError):
        return float("nan")


def load(folder: str, index: int = 0, prefix: str = "tadisr/", when_done: str = "wrap around"):
    """The node's outputs for `index`: the image (RGB), output prefixes for it and its text mask, the
    folder's image count, and the image's transparency as a MASK (`read_image`; last, so saved
    workflows keep their links to the others)."""
    from tadisr_core.images import ImageReadError

    path, name, names = chosen_file(folder, index, when_done)
    try:
        image, mask = read_image(os.path.join(path, name))
    except ImageReadError as exc:
        raise ValueError(f"TADiSR: {exc}. Move it out of the folder (or fix it) and run again.") from None
    stem = prefix + output_stem(name, names)
    return image, stem, f"{stem}_text_mask", len(names), mask
