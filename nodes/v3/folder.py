"""V3 declaration: TADiSR Load Image from Folder (one image per queued run)."""

from __future__ import annotations

from comfy_api.latest import io

from .. import folder_io
from ..errors import reported
from .common import schema


class TADiSRLoadImageFromFolder(io.ComfyNode):
    """Node: TADiSR Load Image from Folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["batch", "folder", "load images", "batch upscale", "directory", "TADiSR"],
            node_id="TADiSRLoadImageFromFolder",
            display_name="TADiSR Load Image from Folder (batch)",
            description=("Loads one image of a folder per run, in natural order (img2 before img10). The index "
                         "increments after each queued run, so queueing the workflow N times (Run with batch count "
                         "N) upscales N images; after the last image it wraps to the first, or stops with a clear "
                         "'done' message. A bad file fails only its own run. As with Load Image, the image comes "
                         "out RGB and its transparency as the mask output."),
            inputs=[
                io.String.Input("folder", default="tadisr_batch", tooltip=(
                    "Folder of images: relative to ComfyUI's input folder (no '..'; empty: the input folder "
                    "itself), or an absolute path.")),
                io.Int.Input("index", default=0, min=0, max=1_000_000, control_after_generate=True, tooltip=(
                    "Which image (0 = first in natural order). 'control after generate' = increment walks the "
                    "folder; values past the end wrap around (or stop, see when_done).")),
                io.String.Input("prefix", default="tadisr/", tooltip=(
                    "Put before the file name in the filename_prefix output (a sub-folder of the output folder).")),
                io.Combo.Input("when_done", options=list(folder_io.WHEN_DONE), default="wrap around", tooltip=(
                    "After the last image: wrap around to the first, or stop (the run fails with 'done').")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The image (RGB; its transparency is the mask output)."),
                io.String.Output(display_name="filename_prefix", tooltip=(
                    "'prefix' + the file name without extension (with it, as page_jpg, when another image shares "
                    "the name): connect to Save Image's filename_prefix.")),
                io.String.Output(display_name="mask_prefix",
                                 tooltip="The same + '_text_mask', for saving the text mask beside the image."),
                io.Int.Output(display_name="count", tooltip="How many images the folder holds."),
                io.Mask.Output(display_name="mask", tooltip=(
                    "The image's transparency, as Load Image gives it: 1 - alpha (all 0 when the file has no "
                    "alpha). Join Image with Alpha puts it back on the image; TADiSR Upscale keeps alpha.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder) -> bool | str:
        if not isinstance(folder, str):  # linked: checked when it runs
            return True
        try:
            folder_io.resolve_folder(folder)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, index, prefix, when_done="wrap around"):
        # Re-run when the served file changes on disk, not only when the widgets change.
        return folder_io.fingerprint(folder, index, when_done)

    @classmethod
    @reported
    def execute(cls, folder, index=0, prefix="tadisr/", when_done="wrap around") -> io.NodeOutput:
        return io.NodeOutput(*folder_io.load(folder, index, prefix, when_done))
