"""V3 declaration: TADiSR Text Attention (heat map and overlay of the captured attention)."""

from __future__ import annotations

from comfy_api.latest import io

from .. import attention_view
from ..errors import reported
from .common import TADiSRAttention, schema


class TADiSRTextAttention(io.ComfyNode):
    """Node: TADiSR Text Attention."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from tadisr_core.heatmap import LAYER_GROUPS, REDUCTIONS

        return schema(
            ["text", "attention", "heat map", "heatmap", "TACA", "cross attention", "text mask", "TADiSR"],
            node_id="TADiSRTextAttention",
            display_name="TADiSR Text Attention Heat Map",
            description=("Shows where the model attends to the word 'text' (TACA cross-attention captured during "
                         "the one-step denoise): a heat map MASK and a colour overlay on the upscaled image. Tiles "
                         "are blended exactly like the image tiles."),
            inputs=[
                TADiSRAttention.Input("attention", tooltip=(
                    "Captured attention from TADiSR One-Step Denoise or the attention output of TADiSR Upscale.")),
                io.Image.Input("image", tooltip=(
                    "Image to draw the overlay on, normally the upscaled image (the heat map is resized to it: the "
                    "same aspect ratio).")),
                io.Combo.Input("layers", options=list(LAYER_GROUPS), default="all", tooltip=(
                    "Which UNet cross-attention layers to read: all, or only the down / mid / up blocks. Up-block "
                    "layers are sharpest; the released Kolors checkpoint hooks no mid-block layer (refused before "
                    "the upscale runs).")),
                io.Combo.Input("heads", options=list(REDUCTIONS), default="mean", tooltip=(
                    "How to combine attention heads (and layers): mean = smooth consensus, max = strongest "
                    "response.")),
                io.Boolean.Input("normalize", default=True, tooltip=(
                    "Stretch each image's heat map to 0..1. Off shows raw attention probabilities (often faint).")),
                io.Combo.Input("colormap", options=list(attention_view.COLORMAPS), default="jet",
                               tooltip="Colours of the overlay."),
                io.Float.Input("opacity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Overlay strength: 0 = image only, 1 = heat map only."),
            ],
            outputs=[io.Mask.Output(display_name="heatmap",
                                    tooltip="Attention heat map, 0..1, the size of the upscaled image."),
                     io.Image.Output(display_name="overlay",
                                     tooltip="The heat map, colour-mapped and blended onto the image.")],
        )

    @classmethod
    @reported
    def execute(cls, attention, image, layers="all", heads="mean", normalize=True, colormap="jet",
                opacity=0.5) -> io.NodeOutput:
        return io.NodeOutput(*attention_view.view(attention, image, layers, heads, normalize, colormap, opacity))
