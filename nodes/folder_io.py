"""TADiSR Load Image from Folder: one image per queued run, for batch upscaling through the queue."""

from __future__ import annotations

import os

import torch

from . import host


def resolve_folder(folder: str) -> str:
    """An absolute folder, or one relative to ComfyUI's input folder; ValueError if it does not exist."""
    path = folder if os.path.isabs(folder) else os.path.join(host.input_directory(), folder)
    if not os.path.isdir(path):
        raise ValueError(f"TADiSR: image folder '{folder}' not found (looked for {path}); give a folder inside "
                         "ComfyUI's input folder or an absolute path")
    return path


def list_images(folder: str) -> list[str]:
    """Sorted image file names directly inside `folder` (the suffixes the CLI reads too)."""
    from tadisr_core.images import is_image_file

    return sorted(f for f in os.listdir(folder) if is_image_file(f) and os.path.isfile(os.path.join(folder, f)))


def read_image(path: str) -> torch.Tensor:
    """An image file as IMAGE [1, H, W, 3] float 0..1 (EXIF orientation applied; gray spread to RGB,
    alpha dropped)."""
    from tadisr_core.images import load_image

    image = load_image(path)[:, :3]
    return image.expand(-1, 3, -1, -1).movedim(1, -1).contiguous()


class TADiSRLoadImageFromFolder:
    """Node: TADiSR Load Image from Folder."""

    DESCRIPTION = ("Loads the image at 'index' (sorted by name) from a folder. With 'control after generate' set to "
                   "increment, queue the workflow once per image (Batch count = image count) to upscale a whole "
                   "folder through the queue; a bad file fails only its own run.")
    CATEGORY = "TADiSR"
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING", "INT")
    RETURN_NAMES = ("image", "filename_prefix", "mask_prefix", "count")
    OUTPUT_TOOLTIPS = ("The image (RGB).",
                       "'prefix' + the file name without extension: connect to Save Image's filename_prefix.",
                       "The same + '_text_mask', for saving the text mask beside the image.",
                       "How many images the folder holds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "tadisr_batch", "tooltip": (
                "Folder of images: relative to ComfyUI's input folder, or an absolute path.")}),
            "index": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "control_after_generate": True, "tooltip": (
                "Which image (0 = first by name). Set 'control after generate' to increment to walk the folder.")}),
            "prefix": ("STRING", {"default": "tadisr/", "tooltip": (
                "Put before the file name in the filename_prefix output (a sub-folder of the output folder).")}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, index, prefix):
        # Re-run when the chosen file changes on disk, not only when the widgets change.
        try:
            path = resolve_folder(folder)
            name = list_images(path)[index]
            return f"{name}:{os.path.getmtime(os.path.join(path, name))}"
        except (ValueError, IndexError, OSError):
            return float("nan")

    def load(self, folder, index=0, prefix="tadisr/"):
        """The image at `index`, output prefixes for it and its mask, and the folder's image count."""
        path = resolve_folder(folder)
        names = list_images(path)
        if not names:
            from tadisr_core.images import IMAGE_SUFFIXES

            raise ValueError(f"TADiSR: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        if not 0 <= index < len(names):
            raise ValueError(f"TADiSR: index {index} is past the last image of {path} ({len(names)} images, "
                             f"indices 0..{len(names) - 1})")
        image = read_image(os.path.join(path, names[index]))
        stem = f"{prefix}{os.path.splitext(names[index])[0]}"
        return image, stem, f"{stem}_text_mask", len(names)
