"""ChatGLM3 kept as one `.safetensors` file, as the Kolors node packs for ComfyUI keep it
(`chatglm3-fp16.safetensors` in `models/LLM/` for ComfyUI-Kolors-MZ, in `models/LLM/checkpoints/` for
ComfyUI-KwaiKolorsWrapper).

Such a file holds ChatGLM3's weights only. Its config follows from the tensor shapes and ChatGLM3's
fixed choices (RMSNorm, rotary embedding, grouped queries), so none is needed. Its tokenizer is not in
the file: it is looked for beside the file, in a `tokenizer/` folder beside it, and in the
`configs/tokenizer/` folder that the node packs ship, in `custom_nodes/` of the ComfyUI tree the file
sits in or of a root given to `add_tokenizer_root` (the nodes give ComfyUI's own).

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
from .scaled_weights import is_side_tensor, iter_dequantized, weight_scales
from .streaming import WeightsHeader, assign_weights, header_mentions, is_safetensors, read_header

# A name every ChatGLM3 weights file holds, looked for in the raw header bytes before any parsing
MARKER = "self_attention.query_key_value"
_PREFIX = "transformer."  # chatglm3-6b's ChatGLMForConditionalGeneration keeps the model under it
_ROTARY = "rotary_pos_emb.inv_freq"
_EMBEDDING = "embedding.word_embeddings.weight"
_QKV = "encoder.layers.0.self_attention.query_key_value.weight"
_PACKS = ("ComfyUI-Kolors-MZ", "ComfyUI-KwaiKolorsWrapper")  # node packs that ship ChatGLM3's tokenizer, first
_CHATGLM3_KV_CHANNELS = 128  # per-head width of every ChatGLM3 (used when the file has no rotary buffer)
log = logging.getLogger("tadisr")
_TOKENIZER_ROOTS: list[Path] = []  # more folders holding custom_nodes/ (add_tokenizer_root)
TOKENIZER_HINT = ("put ChatGLM3's tokenizer.model (with tokenizer_config.json: Kolors' tokenizer/ folder, "
                  "Kwai-Kolors/Kolors) beside it or in a tokenizer/ folder beside it")


def _unprefixed(header: WeightsHeader) -> dict:
    """The file's tensor table under ChatGLMModel's names (chatglm3-6b's "transformer." taken off)."""
    return {k.removeprefix(_PREFIX): v for k, v in header.tensors.items()}


def _header(path: Path) -> WeightsHeader:
    try:
        return read_header(path)
    except ValueError as exc:  # truncated (an interrupted download) or not a safetensors file
        raise KolorsFolderError(f"{exc}; download the ChatGLM3 file again") from None


def is_chatglm_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file holding ChatGLM3 weights (reads the header only). A file
    whose header names ChatGLM3's tensors but cannot be read (a partial download) counts, so that
    loading it says what is wrong with it."""
    path = Path(path)
    if not path.is_file() or not is_safetensors(path) or not header_mentions(path, MARKER):
        return False
    try:
        return _EMBEDDING in _unprefixed(read_header(path))
    except ValueError:
        return True


def add_tokenizer_root(folder: str | Path) -> None:
    """Also look for the node packs' tokenizer under `folder`/custom_nodes (ComfyUI's base path, when
    its model folders lie elsewhere, via extra_model_paths.yaml)."""
    folder = Path(folder).absolute()
    if folder not in _TOKENIZER_ROOTS:
        _TOKENIZER_ROOTS.append(folder)


def _is_chatglm_tokenizer(folder: Path) -> bool:
    """A node pack's tokenizer folder is taken only when its tokenizer_config.json names ChatGLM's."""
    try:
        return "ChatGLMTokenizer" in (folder / "tokenizer_config.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def tokenizer_folders(path: str | Path) -> list[Path]:
    """Where the tokenizer of the ChatGLM3 file `path` is looked for, in order: beside it, tokenizer/
    beside it, then the node packs' configs/tokenizer (Kolors-MZ and KwaiKolorsWrapper first) in the
    ComfyUI tree above it and under the roots of `add_tokenizer_root`."""
    path = Path(path).absolute()
    found = [path.parent, path.parent / "tokenizer"]
    roots = [r for r in (*path.parents, *_TOKENIZER_ROOTS) if (r / "custom_nodes").is_dir()]
    for root in dict.fromkeys(roots):
        packs = sorted((root / "custom_nodes").glob("*/configs/tokenizer"),
                       key=lambda f: (f.parent.parent.name not in _PACKS, f.parent.parent.name))
        found += [f for f in packs if _is_chatglm_tokenizer(f)]
    return found


def find_tokenizer(path: str | Path) -> Path:
    """The folder holding the tokenizer of the ChatGLM3 file `path`; KolorsFolderError naming the
    folders looked in and what to do when there is none."""
    folders = tokenizer_folders(path)
    for folder in folders:
        if (folder / "tokenizer.model").is_file():
            return folder
    raise KolorsFolderError(f"{path} is a ChatGLM3 weights file without its tokenizer: {TOKENIZER_HINT} "
                            f"(looked in {', '.join(str(f) for f in folders)})")


def quantized_bits(path: str | Path, header: WeightsHeader | None = None) -> int | None:
    """8 or 4 for a quantized ChatGLM3 file (int8 weights, each with its per-row `weight_scale`), None
    for one in floats; KolorsFolderError for integer weights of any other layout."""
    shapes = _unprefixed(header or _header(Path(path)))
    quantized = [k for k, v in shapes.items() if k.endswith(".weight") and not v.dtype.is_floating_point]
    if not quantized:
        return None
    qkv, embedding = shapes.get(_QKV), shapes.get(_EMBEDDING)
    scale_of = weight_scales(shapes)
    unscaled = [k for k in quantized if k not in scale_of or shapes[scale_of[k]].shape != shapes[k].shape[:1]]
    if unscaled or qkv is None or embedding is None or qkv.shape[1] not in (embedding.shape[1],
                                                                             embedding.shape[1] // 2):
        raise KolorsFolderError(f"{path}: integer weights ({(unscaled or quantized)[0]}) of a layout that is not "
                                f"ChatGLM3's 8- or 4-bit one (int8 with a per-row weight_scale); pass the fp16 file "
                                f"(chatglm3-fp16.safetensors)")
    return 8 if qkv.shape[1] == embedding.shape[1] else 4


def chatglm_config(path: str | Path, header: WeightsHeader | None = None):
    """diffusers' `ChatGLMConfig` of the ChatGLM3 file `path`: the sizes read from its tensor shapes,
    the rest ChatGLM3's (as in Kolors' text_encoder/config.json)."""
    path = Path(path)
    header = header or _header(path)
    if quantized_bits(path, header) == 4:
        raise KolorsFolderError(f"{path} is a 4-bit ChatGLM3, packed in a layout only its CUDA kernel reads; the "
                                f"prompt cache is computed once: use the fp16 file (chatglm3-fp16.safetensors) or the "
                                f"8-bit one, or Kolors' text_encoder/ folder")
    shapes = {k: v.shape for k, v in _unprefixed(header).items() if not is_side_tensor(k)}
    try:
        vocab, hidden = shapes[_EMBEDDING]
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
        qkv = shapes[_QKV][0]
        attention = shapes["encoder.layers.0.self_attention.dense.weight"][1]  # heads * kv_channels
        ffn = shapes["encoder.layers.0.mlp.dense_4h_to_h.weight"][1]
    except KeyError as exc:
        raise KolorsFolderError(f"{path} is not a ChatGLM3 weights file (it has no {exc}); pass ChatGLM3 "
                                f"(chatglm3-fp16.safetensors, or a folder with config.json)") from None
    except ValueError:
        raise KolorsFolderError(f"{path} is not a ChatGLM3 weights file (its {_EMBEDDING} is "
                                f"{tuple(shapes[_EMBEDDING])}, not vocabulary x width); pass ChatGLM3 "
                                f"(chatglm3-fp16.safetensors, or a folder with config.json)") from None
    kv = 4 * shapes[_ROTARY][0] if _ROTARY in shapes else _CHATGLM3_KV_CHANNELS
    groups, odd = divmod(qkv - attention, 2 * kv)
    if odd or attention % kv or not groups:
        raise KolorsFolderError(f"{path}: the attention widths ({qkv} / {attention}) do not fit heads {kv} wide, and "
                                f"the file has no {_ROTARY} to tell the width; pass ChatGLM3-6B "
                                f"(chatglm3-fp16.safetensors, or a folder with config.json)")
    return encoder_config(num_layers=layers, padded_vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn,
                          kv_channels=kv, num_attention_heads=attention // kv, multi_query_attention=True,
                          multi_query_group_num=groups,
                          add_qkv_bias=_QKV.removesuffix("weight") + "bias" in shapes,
                          original_rope=True)


def encoder_config(**fields):
    """diffusers' `ChatGLMConfig(**fields)` without a key/value cache (the prompt is encoded once).
    diffusers 0.32-0.36 read `config.use_cache`, which the class neither declares nor (under transformers
    5) keeps from its keyword arguments, so it is set on the built config."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    config = ChatGLMConfig(**fields)
    config.use_cache = False
    return config


def load_chatglm_file(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """diffusers' `ChatGLMModel` with the weights of the ChatGLM3 file `path` in `dtype`, read one
    tensor at a time into a model built on the meta device (no random init, no fp32 copy). An 8-bit
    file is dequantized as it is read, with a warning: its prompt cache is close to the fp16 one's."""
    from diffusers.pipelines.kolors import ChatGLMModel

    path = Path(path)
    header = _header(path)
    with torch.device("meta"):
        model = ChatGLMModel(chatglm_config(path, header), empty_init=False)
    if quantized_bits(path, header) == 8:
        log.warning("%s is an 8-bit ChatGLM3: the prompt cache computed from it is close to, not equal to, the "
                    "one from the fp16 weights (the cache says so when it is loaded)", path)
    tensors = ((k.removeprefix(_PREFIX), t) for k, t in iter_dequantized(path, dtype, header=header))
    if _ROTARY not in _unprefixed(header):  # unused by the forward pass
        rotary = type(model.rotary_pos_emb)(model.rotary_pos_emb.dim, device="cpu").inv_freq.to(dtype)
        tensors = chain(tensors, [(_ROTARY, rotary)])
    assign_weights(model, tensors, path)
    return model
