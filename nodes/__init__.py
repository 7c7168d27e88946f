"""ComfyUI nodes of TADiSR: thin adapters over tadisr_core (V1 node interface).

Importing this package is cheap: tadisr_core, diffusers and peft load when a node first runs.
"""

from . import host
from .attention_view import TADiSRTextAttention
from .blocks import TADiSRDecode, TADiSRDenoise, TADiSREncode
from .folder_io import TADiSRLoadImageFromFolder
from .loaders import TADiSRLoadModel
from .upscale import TADiSRUpscale

NODE_CLASS_MAPPINGS = {
    "TADiSRLoadModel": TADiSRLoadModel,
    "TADiSRUpscale": TADiSRUpscale,
    "TADiSREncode": TADiSREncode,
    "TADiSRDenoise": TADiSRDenoise,
    "TADiSRDecode": TADiSRDecode,
    "TADiSRTextAttention": TADiSRTextAttention,
    "TADiSRLoadImageFromFolder": TADiSRLoadImageFromFolder,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TADiSRLoadModel": "Load TADiSR Model",
    "TADiSRUpscale": "TADiSR Upscale (all in one)",
    "TADiSREncode": "TADiSR Encode",
    "TADiSRDenoise": "TADiSR One-Step Denoise",
    "TADiSRDecode": "TADiSR Joint Decode",
    "TADiSRTextAttention": "TADiSR Text Attention",
    "TADiSRLoadImageFromFolder": "TADiSR Load Image from Folder",
}

host.register_model_folders()
