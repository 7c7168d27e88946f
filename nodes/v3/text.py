"""V3 declarations: TADiSR Text Mask Composite and TADiSR Read Text (OCR)."""

from __future__ import annotations

from comfy_api.latest import io

from .. import text_tools
from ..errors import reported
from .common import schema


class TADiSRTextComposite(io.ComfyNode):
    """Node: TADiSR Text Mask Composite."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["text mask", "composite", "paste text", "text", "super resolution", "upscale", "mix upscalers",
             "esrgan", "TADiSR"],
            node_id="TADiSRTextComposite",
            display_name="TADiSR Text Mask Composite",
            description=("Pastes TADiSR's text regions onto another upscaler's image of the same scene: the text "
                         "mask is thresholded, grown and feathered (the soft edge stays inside the grown area), the "
                         "other image is resized to TADiSR's size. Outside the grown mask the result is exactly the "
                         "other image; on the text it is TADiSR's."),
            inputs=[
                io.Image.Input("tadisr_image", tooltip="The upscaled image from TADiSR Upscale (or Joint Decode)."),
                io.Mask.Input("text_mask", tooltip="TADiSR's text mask of that image (the same size)."),
                io.Image.Input("other_image", tooltip=(
                    "Any other upscaler's result for the same input (e.g. an ESRGAN model via Upscale Image (using "
                    "Model)); resized to TADiSR's size (the same aspect ratio). One image serves a whole batch.")),
                io.Int.Input("grow", default=8, min=0, max=256, tooltip=(
                    "Grow the text regions by this many pixels, so glyph edges and halos come from TADiSR too.")),
                io.Int.Input("feather", default=4, min=0, max=256, tooltip=(
                    "Width of the soft edge in pixels, inside the grown area and outside the text (at most half "
                    "of 'grow').")),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Mask values at or above this count as text."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip=(
                         "The other image with TADiSR's text pasted in (with the TADiSR image's alpha, when it has "
                         "one).")),
                     io.Mask.Output(display_name="used_mask", tooltip="The grown, feathered mask that was used.")],
        )

    @classmethod
    @reported
    def execute(cls, tadisr_image, text_mask, other_image, grow=8, feather=4, threshold=0.5) -> io.NodeOutput:
        return io.NodeOutput(*text_tools.composite(tadisr_image, text_mask, other_image, grow, feather, threshold))


class TADiSRReadText(io.ComfyNode):
    """Node: TADiSR Read Text (OCR)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["OCR", "read text", "text recognition", "text", "text mask", "RapidOCR", "TADiSR"],
            node_id="TADiSRReadText",
            display_name="TADiSR Read Text (OCR)",
            description=("Reads the text in an image with RapidOCR (optional: pip install \"rapidocr>=3.10\" "
                         "\"onnxruntime>=1.18\"), optionally only where TADiSR's text mask covers it. Gives the "
                         "recognised lines as text and the image with their boxes drawn."),
            inputs=[
                io.Image.Input("image", tooltip="Image to read, normally TADiSR's upscaled image."),
                io.Mask.Input("text_mask", optional=True, tooltip=(
                    "Optional: keep only lines this mask covers (TADiSR's text mask of the same image).")),
                io.Float.Input("min_score", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Drop lines recognised with less confidence than this."),
                io.Float.Input("min_coverage", default=0.25, min=0.0, max=1.0, step=0.05, tooltip=(
                    "With a mask: the mask's mean over a line's box must reach this for the line to be kept.")),
            ],
            outputs=[io.String.Output(display_name="text", tooltip=(
                         "The recognised lines, one per line (images of a batch separated by a blank line).")),
                     io.Image.Output(display_name="boxes", tooltip="The image with the found lines outlined.")],
        )

    @classmethod
    def validate_inputs(cls, image) -> bool | str:
        # Refused before anything upstream runs when the optional OCR packages are missing or too old.
        from tadisr_core.reading import ocr_unavailable

        problem = ocr_unavailable()
        return f"TADiSR Read Text: {problem} (in the Python that runs ComfyUI)" if problem else True

    @classmethod
    @reported
    def execute(cls, image, min_score=0.5, min_coverage=0.25, text_mask=None) -> io.NodeOutput:
        return io.NodeOutput(*text_tools.read_text(image, text_mask, min_score, min_coverage))
