"""ChatGLM3 kept as one `.safetensors` file, as the Kolors node packs for ComfyUI keep it
(`models/LLM/chatglm3-fp16.safetensors` for ComfyUI-Kolors-MZ and ComfyUI-KwaiKolorsWrapper).

Such a file holds ChatGLM3's weights only. Its config follows from the tensor shapes and ChatGLM3's
fixed choices (RMSNorm, rotary embedding, grouped queries), so none is needed. Its tokenizer is not in
the file: it is looked for beside the file, in a `tokenizer/` folder beside it, and in the
`configs/tokenizer/` folder that the node packs ship in `custom_nodes/` of the ComfyUI tree the file
sits in.

Kolors-MZ also keeps 8- and 4-bit files: the four linear layers of each block as int8 with a
per-row `weight_scale` (ChatGLM's own quantization: weight = int8 x scale). An 8-bit file is read
back to fp16 that way; a 4-bit file packs two values a byte in an order only its CUDA kernel
knows, and is refused.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import torch

from .kolors_files import KolorsFolderError
from .streaming import WeightsHeader, assign_weights, header_mentions, iter_tensors, read_header

# A name every ChatGLM3 weights file holds, looked for in the raw header bytes before any parsing
MARKER = "self_attention.query_key_value"
_PREFIX = "transformer."  # chatglm3-6b's ChatGLMForConditionalGeneration keeps the model under it
_ROTARY = "rotary_pos_emb.inv_freq"
_SCALE = "_scale"  # `<layer>.weight_scale` beside an int8 `<layer>.weight`
_CHATGLM3_KV_CHANNELS = 128  # per-head width of every ChatGLM3 (used when the file has no rotary buffer)
log = logging.getLogger("tadisr")
TOKENIZER_HINT = ("put ChatGLM3's tokenizer.model (with tokenizer_config.json: Kolors' tokenizer/ folder, "
                  "Kwai-Kolors/Kolors) beside it or in a tokenizer/ folder beside it")


def is_chatglm_file(path: str | Path) -> bool:
    """Whether `path` is a `.safetensors` file holding ChatGLM3 weights (reads the header only)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file() or not header_mentions(path, MARKER):
        return False
    try:
        keys = read_header(path).tensors
    except ValueError:
        return False
    return any(k.removeprefix(_PREFIX) == "embedding.word_embeddings.weight" for k in keys)


def tokenizer_folders(path: str | Path) -> list[Path]:
    """Where the tokenizer of the ChatGLM3 file `path` is looked for, in order."""
    path = Path(path).absolute()
    found = [path.parent, path.parent / "tokenizer"]
    for root in path.parents:
        if (root / "custom_nodes").is_dir():  # a ComfyUI tree: the Kolors node packs ship the tokenizer
            found += sorted((root / "custom_nodes").glob("*/configs/tokenizer"))
    return found


def find_tokenizer(path: str | Path) -> Path:
    """The folder holding the tokenizer of the ChatGLM3 file `path`; KolorsFolderError saying where
    it was looked for and what to do when there is none."""
    for folder in tokenizer_folders(path):
        if (folder / "tokenizer.model").is_file():
            return folder
    raise KolorsFolderError(f"{path} is a ChatGLM3 weights file without its tokenizer: {TOKENIZER_HINT} "
                            f"(looked beside it and in the Kolors node packs' configs/tokenizer/)")


def quantized_bits(path: str | Path, header: WeightsHeader | None = None) -> int | None:
    """8 or 4 for a quantized ChatGLM3 file (int8 weights with their scales), None for one in floats."""
    header = header or read_header(Path(path))
    shapes = {k.removeprefix(_PREFIX): v for k, v in header.tensors.items()}
    quantized = [k for k, v in shapes.items() if k.endswith(".weight") and not v.dtype.is_floating_point]
    if not quantized:
        return None
    qkv = shapes.get("encoder.layers.0.self_attention.query_key_value.weight")
    embedding = shapes.get("embedding.word_embeddings.weight")
    if qkv is None or embedding is None or qkv.shape[1] not in (embedding.shape[1], embedding.shape[1] // 2):
        raise KolorsFolderError(f"{path}: integer weights ({quantized[0]}) of a layout that is not ChatGLM3's 8- or "
                                f"4-bit one; pass the fp16 file (chatglm3-fp16.safetensors)")
    return 8 if qkv.shape[1] == embedding.shape[1] else 4


def chatglm_config(path: str | Path, header: WeightsHeader | None = None):
    """diffusers' `ChatGLMConfig` of the ChatGLM3 file `path`: the sizes read from its tensor shapes,
    the rest ChatGLM3's (as in Kolors' text_encoder/config.json)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    path = Path(path)
    header = header or read_header(path)
    if quantized_bits(path, header) == 4:
        raise KolorsFolderError(f"{path} is a 4-bit ChatGLM3, packed in a layout only its CUDA kernel reads; the "
                                f"prompt cache is computed once: use the fp16 file (chatglm3-fp16.safetensors) or the "
                                f"8-bit one, or Kolors' text_encoder/ folder")
    shapes = {k.removeprefix(_PREFIX): v for k, v in header.shapes().items() if not k.endswith(_SCALE)}
    try:
        vocab, hidden = shapes["embedding.word_embeddings.weight"]
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
        qkv = shapes["encoder.layers.0.self_attention.query_key_value.weight"][0]
        attention = shapes["encoder.layers.0.self_attention.dense.weight"][1]  # heads * kv_channels
        ffn = shapes["encoder.layers.0.mlp.dense_4h_to_h.weight"][1]
    except (KeyError, ValueError) as exc:
        raise KolorsFolderError(f"{path} is not a ChatGLM3 weights file (no {exc}); pass ChatGLM3 "
                                f"(chatglm3-fp16.safetensors, or a folder with config.json)") from None
    kv = 4 * shapes[_ROTARY][0] if _ROTARY in shapes else _CHATGLM3_KV_CHANNELS
    groups, odd = divmod(qkv - attention, 2 * kv)
    if odd or attention % kv or not groups:
        raise KolorsFolderError(f"{path}: the attention widths ({qkv} / {attention}) do not fit heads {kv} wide, and "
                                f"the file has no {_ROTARY} to tell the width; pass ChatGLM3-6B "
                                f"(chatglm3-fp16.safetensors, or a folder with config.json)")
    return ChatGLMConfig(num_layers=layers, padded_vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn,
                         kv_channels=kv, num_attention_heads=attention // kv, multi_query_attention=True,
                         multi_query_group_num=groups,
                         add_qkv_bias="encoder.layers.0.self_attention.query_key_value.bias" in shapes,
                         original_rope=True)


def _dequantized(path: Path, header: WeightsHeader, dtype: torch.dtype):
    """(name, tensor) of an 8-bit file in `dtype`: each int8 weight times its row scales (in the scales'
    dtype, as ChatGLM's quantized layers compute it), one tensor at a time."""
    scales = dict(iter_tensors(path, rename=lambda k: k if k.endswith(_SCALE) else None, header=header))
    for name, t in iter_tensors(path, header=header):
        if name.endswith(_SCALE):
            continue
        scale = scales.get(name + _SCALE)
        if scale is not None:
            t = t.to(scale.dtype) * scale[:, None]
        yield name, t.to(dtype) if t.is_floating_point() else t


def load_chatglm_file(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """diffusers' `ChatGLMModel` with the weights of the ChatGLM3 file `path` in `dtype`, read one
    tensor at a time into a model built on the meta device (no random init, no fp32 copy). An 8-bit
    file is dequantized as it is read, with a warning: its prompt cache is close to the fp16 one's."""
    from diffusers.pipelines.kolors import ChatGLMModel

    path = Path(path)
    header = read_header(path)
    with torch.device("meta"):
        model = ChatGLMModel(chatglm_config(path, header), empty_init=False)
    if quantized_bits(path, header) == 8:
        log.warning("%s is an 8-bit ChatGLM3: the prompt cache computed from it is close to, not equal to, the "
                    "one from the fp16 weights", path)
        tensors = _dequantized(path, header, dtype)
    else:
        tensors = iter_tensors(path, dtype, header=header)
    tensors = ((k.removeprefix(_PREFIX), t) for k, t in tensors)
    if not any(k.removeprefix(_PREFIX) == _ROTARY for k in header.tensors):  # unused by the forward pass
        rotary = type(model.rotary_pos_emb)(model.rotary_pos_emb.dim, device="cpu").inv_freq.to(dtype)
        tensors = chain(tensors, [(_ROTARY, rotary)])
    assign_weights(model, tensors, path)
    return model
