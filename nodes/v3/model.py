"""V3 declarations: Load TADiSR Model and TADiSR Upscale (the all-in-one node)."""

from __future__ import annotations

from comfy_api.latest import io

from tadisr_core.descriptor import DESCRIPTOR

from .. import graph, loaders, upscale
from ..errors import reported
from .common import (
    TADiSRAttention,
    TADiSRModel,
    color_fix_input,
    image_input,
    model_input,
    schema,
    tiling_inputs,
    validate_tiling,
)

SIZE = DESCRIPTOR.size  # default scale, tile and overlap


class TADiSRLoadModel(io.ComfyNode):
    """Node: Load TADiSR Model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from tadisr_core.devices import DTYPE_CHOICES

        return schema(
            ["Kolors", "TADiSR", "super resolution", "upscale model", "load model", "text-aware"],
            node_id="TADiSRLoadModel",
            display_name="Load TADiSR Model (Kolors)",
            description=(
                "Loads TADiSR (text-aware 4x super-resolution): the Kolors base model (a diffusers folder in "
                "models/diffusers, a Kolors UNet file in models/unet + the SDXL VAE in models/vae, or a Kolors "
                "checkpoint in models/checkpoints), the TADiSR "
                "checkpoint from models/tadisr and the cached prompt conditioning; or one of the small built-in demo "
                "models, which need none of them. Loaded models are cached and handed to ComfyUI's memory manager, "
                "which offloads them when other models need VRAM."),
            inputs=[
                io.Combo.Input("kolors", options=loaders.kolors_choices(), tooltip=(
                    "Kolors base model: a diffusers folder in models/diffusers or a sub-folder of it (unet/ and vae/, "
                    "or a folder without vae/ + an SDXL VAE file from models/vae), a Kolors UNet file from models/unet "
                    "(fp16, or fp8 / scaled fp8; .safetensors, or a torch .bin / .pt / .ckpt / .pth) + an SDXL VAE "
                    "file, or an all-in-one Kolors checkpoint from models/checkpoints (+ an "
                    "SDXL VAE file when it has none inside). text_encoder/ + tokenizer/ (or ChatGLM3 in models/LLM) are"
                    " only read once, to compute the prompt cache. 'demo': the small model shipped with the pack "
                    "(trained on synthetic text scenes), no Kolors needed; 'demo-release': its twin with the released "
                    "checkpoint's layout. Both ignore checkpoint and prompt_cache.")),
                io.Combo.Input("checkpoint", options=loaders.checkpoint_choices(), tooltip=(
                    "TADiSR weights in models/tadisr: the released tadisr_kolors_ftsr_526000.pkl or a .safetensors "
                    "conversion (python -m tadisr_core.checkpoint convert). Ignored by the demo models.")),
                io.Combo.Input("prompt_cache", options=loaders.prompt_cache_choices(), default=loaders.AUTO_CACHE,
                               tooltip=(
                    "Prompt conditioning. 'auto' uses models/tadisr/prompt_cache_<kolors folder>.safetensors and "
                    "computes it once when missing, from the folder's ChatGLM3 when its text_encoder/ is whole, else "
                    "from models/LLM or a sub-folder of it (a ChatGLM3 folder or chatglm3-fp16.safetensors); it "
                    "needs ~13 GB VRAM or a few minutes on CPU; afterwards "
                    "ChatGLM3 is never loaded again. Ignored by the demo models.")),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=(
                    "Weight precision. auto = bf16 on GPUs that support it, else fp16 (VAE kept fp32; fp32 for the "
                    "demo models, trained in fp32), fp32 on CPU. "
                    "bf16/fp16 halve VRAM; fp8_e4m3fn stores the UNet in fp8 (computed in bf16), about half of bf16.")),
                io.Combo.Input("device", options=loaders.device_choices(), default="auto",
                               tooltip="Where to run. auto = ComfyUI's device."),
                io.Boolean.Input("merge_lora", default=True, tooltip=(
                    "Fold the LoRA weights into the base layers once at load: faster per tile, same result up to "
                    "rounding. Off keeps the LoRA layers separate.")),
            ],
            outputs=[TADiSRModel.Output(display_name="model", tooltip=(
                "The loaded TADiSR model, for the Upscale / Encode / Denoise / Decode nodes."))],
        )

    @classmethod
    def validate_inputs(cls, checkpoint) -> bool | str:
        # Only 'checkpoint' is named, so its message (where the file belongs) is attached to it alone
        # (ComfyUI attaches a message to every input named here). A Kolors choice that is not in the
        # list is refused by ComfyUI itself since late 2025 ("Value not in list", naming the input);
        # 0.3.75 passes it on, and the loader then gives the library's KolorsFolderError message.
        return True if checkpoint is None else loaders.validate_checkpoint(checkpoint)

    @classmethod
    def fingerprint_inputs(cls, kolors, checkpoint, prompt_cache=loaders.AUTO_CACHE, dtype="auto", device="auto",
                           **_) -> str | float:
        # A file replaced on disk under the same name is loaded again, not served from the node cache.
        return loaders.fingerprint(kolors, checkpoint, prompt_cache, dtype, device)

    @classmethod
    @reported
    def execute(cls, kolors, checkpoint, prompt_cache=loaders.AUTO_CACHE, dtype="auto", device="auto",
                merge_lora=True) -> io.NodeOutput:
        return io.NodeOutput(loaders.load_model(kolors, checkpoint, prompt_cache, dtype, device, merge_lora))


class TADiSRUpscale(io.ComfyNode):
    """Node: TADiSR Super-Resolution Upscale (all in one)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            ["super resolution", "upscale", "4x", "text", "text mask", "SR", "TADiSR", "esrgan alternative"],
            node_id="TADiSRUpscale",
            display_name="TADiSR Super-Resolution Upscale (4x, text mask)",
            description=(
                "Text-aware super-resolution in one node: bicubic resize by 'scale', then one TADiSR step per "
                "overlapping tile (encode, one-step denoise at t=200, joint image + text-mask decode), blended "
                "with a Hann window. Gives the upscaled image and a mask of where text is. Image batches are "
                "processed tile by tile; Cancel stops between tiles."),
            inputs=[
                model_input(),
                image_input(),
                *tiling_inputs(),
                io.Boolean.Input("capture_attention", default=False, tooltip=(
                    "Also output the cross-attention to the word 'text' (for TADiSR Text Attention). Same image "
                    "and mask in the same single pass; each tile's attention maps are kept in RAM.")),
                color_fix_input(),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled image (scale x the input size)."),
                io.Mask.Output(display_name="text_mask", tooltip=(
                    "Where the model sees text: 0..1, same size as the image. When nothing is connected here the "
                    "mask is not computed (faster, the same image).")),
                TADiSRAttention.Output(display_name="attention", tooltip=(
                    "Captured 'text' attention for TADiSR Text Attention; empty unless 'capture_attention' is on.")),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, tile, overlap) -> bool | str:
        return validate_tiling(tile, overlap)

    @classmethod
    @reported
    def execute(cls, model, image, scale=SIZE.default_scale, tile=SIZE.default_tile,
                overlap=SIZE.default_overlap, tile_batch=0, capture_attention=False,
                color_fix="auto") -> io.NodeOutput:
        if hasattr(model, "model"):  # a wrong 'model' input is reported by upscale() itself
            from tadisr_core.heatmap import channel_groups

            graph.check_attention_use(cls.hidden.prompt, cls.hidden.unique_id, 2,
                                      channel_groups(model.model), bool(capture_attention))
        mask = graph.text_mask_wanted(cls.hidden.prompt, cls.hidden.unique_id)
        return io.NodeOutput(*upscale.upscale(model, image, scale, tile, overlap, tile_batch,
                                              bool(capture_attention), color_fix, mask))
