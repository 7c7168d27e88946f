"""V3 declarations: the graph blocks Encode -> One-Step Denoise -> Joint Decode."""

from __future__ import annotations

from comfy_api.latest import io

from tadisr_core.descriptor import DESCRIPTOR

from .. import blocks, graph
from ..errors import reported
from .common import (
    TADiSRAttention,
    TADiSRLatents,
    color_fix_input,
    image_input,
    model_input,
    schema,
    tile_batch_input,
    tiling_inputs,
    validate_tiling,
)

SIZE = DESCRIPTOR.size  # default scale, tile and overlap


class TADiSREncode(io.ComfyNode):
    """Node: TADiSR Encode."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["super resolution", "encode", "VAE encode", "tiles", "TADiSR"],
            node_id="TADiSREncode",
            display_name="TADiSR Encode (step 1 of 3)",
            description=("Step 1 of 3: resizes the image by 'scale' (bicubic), cuts it into overlapping tiles and "
                         "VAE-encodes each tile (keeping the encoder features the joint decoder reuses)."),
            inputs=[model_input(), image_input(), *tiling_inputs()],
            outputs=[TADiSRLatents.Output(display_name="latents",
                                          tooltip="Encoded tiles of the whole batch, for TADiSR One-Step Denoise.")],
        )

    @classmethod
    def validate_inputs(cls, tile, overlap) -> bool | str:
        return validate_tiling(tile, overlap)

    @classmethod
    @reported
    def execute(cls, model, image, scale=SIZE.default_scale, tile=SIZE.default_tile,
                overlap=SIZE.default_overlap, tile_batch=0) -> io.NodeOutput:
        return io.NodeOutput(blocks.encode(model, image, scale, tile, overlap, tile_batch))


class TADiSRDenoise(io.ComfyNode):
    """Node: TADiSR One-Step Denoise."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["super resolution", "denoise", "one step", "UNet", "attention", "TADiSR"],
            node_id="TADiSRDenoise",
            display_name="TADiSR One-Step Denoise (step 2 of 3)",
            description=("Step 2 of 3: one UNet pass at timestep 200 per tile turns the degraded latents into clean "
                         "ones, capturing the cross-attention to the word 'text' on the way."),
            inputs=[model_input(),
                    TADiSRLatents.Input("latents", tooltip="Encoded tiles from TADiSR Encode."),
                    tile_batch_input()],
            outputs=[TADiSRLatents.Output(display_name="latents", tooltip="Denoised tiles, for TADiSR Joint Decode."),
                     TADiSRAttention.Output(display_name="attention",
                                            tooltip="Captured 'text' attention per tile, for TADiSR Text Attention.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    @reported
    def execute(cls, model, latents, tile_batch=0) -> io.NodeOutput:
        if hasattr(model, "model"):
            from tadisr_core.heatmap import channel_groups

            graph.check_attention_use(cls.hidden.prompt, cls.hidden.unique_id, 1, channel_groups(model.model))
        return io.NodeOutput(*blocks.denoise(model, latents, tile_batch))


class TADiSRDecode(io.ComfyNode):
    """Node: TADiSR Joint Decode."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["super resolution", "decode", "text mask", "joint decoder", "TADiSR"],
            node_id="TADiSRDecode",
            display_name="TADiSR Joint Decode: image + text mask (step 3 of 3)",
            description=("Step 3 of 3: the VAE decoder and the text-segmentation decoder run side by side on every "
                         "tile; tiles are blended (Hann window) into the upscaled image and its text mask."),
            inputs=[model_input(),
                    TADiSRLatents.Input("latents", tooltip="Denoised tiles from TADiSR One-Step Denoise."),
                    tile_batch_input(), color_fix_input()],
            outputs=[io.Image.Output(display_name="image", tooltip="The upscaled image (scale x the input size)."),
                     io.Mask.Output(display_name="text_mask",
                                    tooltip="Where the model sees text: 0..1, same size as the image.")],
        )

    @classmethod
    @reported
    def execute(cls, model, latents, tile_batch=0, color_fix="auto") -> io.NodeOutput:
        return io.NodeOutput(*blocks.decode(model, latents, tile_batch, color_fix))
