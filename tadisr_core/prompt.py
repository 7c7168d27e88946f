"""The cached prompt conditioning: computed once with Kolors' ChatGLM3, then loaded without it.

Layout of the cache (safetensors): `prompt_embeds` (1, L, 4096) = ChatGLM hidden_states[-2],
`text_embeds` (1, 4096) = hidden_states[-1] at the last position, `time_ids` (1, 6), and metadata:
the prompt, the token count L, the columns of the word "text" in the left-padded sequence.
"""

from __future__ import annotations

import gc
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import HEATMAP_PROMPT, SDXL_TIME_IDS
from .wording import named

# The release's heat map read column 12 of the 256-long sequence: a padding position (its index
# arithmetic assumed a CLIP-style [SOS] and no left padding). Kept to reproduce the release.
RELEASE_PAD_COLUMN = 12
log = logging.getLogger("tadisr")


@dataclass
class PromptCache:
    """Prompt conditioning for the UNet plus where the word "text" sits in it."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    prompt: str = HEATMAP_PROMPT
    text_columns: tuple[int, ...] = ()
    note: str = ""  # set when the conditioning is not Kolors' exact one (8-bit file, other ChatGLM); warned on load

    def columns(self, token: str) -> tuple[int, ...]:
        """Token columns to read attention from: "text" (the real word) or "release-pad"."""
        if token == "release-pad":
            return (RELEASE_PAD_COLUMN,)
        if token != "text":
            raise ValueError(f"unknown token choice {token!r}; use 'text' or 'release-pad'")
        if not self.text_columns:
            raise ValueError(f"the prompt cache has no column for the word 'text' (prompt {self.prompt!r})")
        return self.text_columns

    def check_fits(self, hidden: int) -> None:
        """ValueError unless this conditioning fits a UNet whose text projection takes `hidden`-wide
        embeddings (4096 for Kolors' ChatGLM3): prompt and pooled embeddings that wide, 6 time ids."""
        got = (self.prompt_embeds.shape[-1], self.text_embeds.shape[-1], self.time_ids.numel())
        if got != (hidden, hidden, 6):
            raise ValueError(f"the prompt cache does not fit this model: its embeddings are {got[0]} / {got[1]} "
                             f"wide with {got[2]} time ids, the UNet takes {hidden} / {hidden} and 6 (was it made "
                             f"for another model?); compute it from this model's ChatGLM3 with `tadisr "
                             f"prompt-cache --kolors DIR -o FILE`")

    def save(self, path: str | Path) -> None:
        """Write the cache as one safetensors file with metadata (atomically)."""
        from safetensors.torch import save_file

        from .files import atomic_path

        tensors = {"prompt_embeds": self.prompt_embeds, "text_embeds": self.text_embeds, "time_ids": self.time_ids}
        meta = {"format": "tadisr-prompt-cache/1", "prompt": self.prompt,
                "text_columns": json.dumps(list(self.text_columns)), "tokens": str(self.prompt_embeds.shape[1]),
                **({"note": self.note} if self.note else {})}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "PromptCache":
        """Read a cache written by `save` (needs no ChatGLM)."""
        from safetensors import safe_open

        from .files import require_readable
        from .finite import first_problem

        path = require_readable(path, "prompt cache", f"compute it once with `tadisr prompt-cache --kolors DIR "
                                                      f"-o {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "tadisr-prompt-cache/1":
                    raise ValueError(f"{path} is not a TADiSR prompt cache (metadata format={meta.get('format')!r}); "
                                     f"pass the file written by `tadisr prompt-cache`")
                tensors = {k: f.get_tensor(k) for k in ("prompt_embeds", "text_embeds", "time_ids")}
            columns = json.loads(meta["text_columns"])
            prompt = meta["prompt"]
        except (KeyError, TypeError, json.JSONDecodeError, OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable prompt cache ({type(e).__name__}: {e}); pass the .safetensors "
                             f"file written by `tadisr prompt-cache`") from None
        except Exception as e:  # safetensors' own error type (a .pkl or truncated file)
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{path}: not a prompt cache (.safetensors) or truncated ({e}); pass the file "
                             f"written by `tadisr prompt-cache`") from None
        problem = _layout_problem(tensors, columns)
        if problem:
            raise ValueError(f"{path}: not a prompt cache of one prompt ({problem}); recompute it with `tadisr "
                             f"prompt-cache`")
        bad = first_problem(tensors)
        if bad:
            raise ValueError(f"{path}: prompt cache tensor {bad[0]} {bad[1]}; recompute it with `tadisr prompt-cache`")
        if meta.get("note"):
            log.warning("%s: %s; delete it to compute it again from Kolors' fp16 ChatGLM3 (its text_encoder/ or "
                        "chatglm3-fp16.safetensors)", path, meta["note"])
        return cls(prompt=str(prompt), text_columns=tuple(columns), note=meta.get("note", ""),
                   **{k: v.float() for k, v in tensors.items()})


def _layout_problem(tensors: dict[str, torch.Tensor], columns) -> str | None:
    """What is wrong with a cache's tensors and "text" columns as `PromptCache.save` writes them (prompt_embeds
    [1, L, H], text_embeds [1, H], time_ids [1, 6], floats; the columns a list of ints in 0..L-1), or None."""
    embeds, pooled, time_ids = (tensors[k] for k in ("prompt_embeds", "text_embeds", "time_ids"))
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            return f"{name} holds {str(tensor.dtype).replace('torch.', '')}, not floats"
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        return f"prompt_embeds is {list(embeds.shape)}, not [1, tokens, width]"
    if list(pooled.shape) != [1, embeds.shape[2]]:
        return f"text_embeds is {list(pooled.shape)}, not [1, {embeds.shape[2]}]"
    if list(time_ids.shape) != [1, 6]:
        return f"time_ids is {list(time_ids.shape)}, not [1, 6]"
    tokens = embeds.shape[1]
    if not isinstance(columns, list) or not all(type(c) is int and 0 <= c < tokens for c in columns):
        return f"its 'text' columns {columns!r} are not a list of token positions 0..{tokens - 1}"
    return None


def find_word_columns(tokenizer, prompt: str, word: str, max_length: int) -> tuple[int, ...]:
    """Columns of `word` in the left-padded, special-token-prefixed sequence the encoder sees."""
    def norm(pieces):
        return [p.replace("\u2581", "").lower() for p in pieces]

    pieces = norm(tokenizer.tokenize(prompt))
    target = norm(tokenizer.tokenize(word))
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    if len(pieces) + 2 > min(max_length, len(ids)):  # a length < 1 is not padded to, nor truncated at
        raise ValueError(f"prompt of {len(pieces)} tokens does not fit {max_length} (2 are special tokens); use a "
                         f"longer sequence ({named('--tokens', 'max_length')}, Kolors: 256) or a shorter prompt")
    content_start = len(ids) - len(pieces)  # left padding, then [gMASK] sop, then the pieces
    starts = [i for i in range(len(pieces) - len(target) + 1) if pieces[i:i + len(target)] == target]
    return tuple(content_start + s + j for s in starts for j in range(len(target)))


@torch.no_grad()
def compute_prompt_cache(text_encoder, tokenizer, prompt: str = HEATMAP_PROMPT, max_length: int = 256,
                         time_ids: tuple[float, ...] = SDXL_TIME_IDS) -> PromptCache:
    """Encode `prompt` the way diffusers' Kolors pipeline does (no classifier-free guidance)."""
    device = next(text_encoder.parameters()).device
    inputs = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").to(device)
    out = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"], output_hidden_states=True)
    prompt_embeds = out.hidden_states[-2].permute(1, 0, 2).clone().float()  # ChatGLM is sequence-first
    text_embeds = out.hidden_states[-1][-1, :, :].clone().float()
    if len(time_ids) != 6:
        raise ValueError(f"time_ids needs 6 values (orig h, w, crop top, left, target h, w), got {time_ids}")
    return PromptCache(prompt_embeds.cpu(), text_embeds.cpu(), torch.tensor([list(time_ids)], dtype=torch.float32),
                       prompt, find_word_columns(tokenizer, prompt, "text", max_length))


CHATGLM_BYTES = 14 << 30  # ChatGLM3-6B in fp16 or bf16 plus activations: what computing the cache needs


def find_text_encoder(source: str | Path) -> tuple[Path, Path]:
    """(ChatGLM3 weights, tokenizer folder) from any of the layouts users keep: a Kolors folder
    (text_encoder/ + tokenizer/), a ChatGLM3 folder (e.g. models/LLM/chatglm3-6b-base, config.json +
    tokenizer.model side by side), a text_encoder folder holding its own tokenizer, or a single
    ChatGLM3 `.safetensors` file (models/LLM/chatglm3-fp16.safetensors, `chatglm_file`): the weights
    are a folder in the first three and the file in the last. Raises KolorsFolderError naming what
    is missing."""
    from .chatglm_file import chatglm_config, find_tokenizer, is_chatglm_file
    from .kolors_files import KolorsFolderError
    from .streaming import shards_folder, unreadable_format

    root = shards_folder(Path(source))  # the *.index.json of sharded weights stands for its folder
    if root.is_file():
        if "-of-" in root.name and (root.parent / "config.json").is_file():  # model-00001-of-00007.safetensors
            raise KolorsFolderError(f"{root} is one shard of a ChatGLM3 folder; pass the folder ({root.parent}) or "
                                    f"the Kolors folder above it")
        if not is_chatglm_file(root):
            raise KolorsFolderError(unreadable_format(root) or (
                f"{root} is not a ChatGLM3 weights file (.safetensors with ChatGLM3's tensors); pass ChatGLM3 "
                f"(a Kolors folder, a ChatGLM3 folder or chatglm3-fp16.safetensors)"))
        chatglm_config(root)  # a partial download or a 4-bit file is named before its tokenizer is looked for
        return root, find_tokenizer(root)
    if (root / "config.json").is_file() and (root / "tokenizer.model").is_file():
        _require_chatglm_config(root / "config.json")
        _require_weights(root)
        return root, root
    if not root.is_dir():
        raise KolorsFolderError(f"ChatGLM3 not found: {root} (give a Kolors folder, its text_encoder folder, a "
                                f"ChatGLM3 folder or a ChatGLM3 .safetensors file)")
    encoder = root / "text_encoder"
    tokenizer = encoder if (encoder / "tokenizer.model").is_file() else root / "tokenizer"
    for folder, marker in ((encoder, "config.json"), (tokenizer, "tokenizer.model")):
        if not (folder / marker).is_file():
            raise KolorsFolderError(f"{folder / marker} is missing: computing the prompt cache needs "
                                    f"Kolors' ChatGLM3 {folder.name}/ (or a ChatGLM3 folder with config.json and "
                                    f"tokenizer.model, chatglm3-fp16.safetensors, or a precomputed prompt cache)")
    _require_chatglm_config(encoder / "config.json")
    _require_weights(encoder)
    return encoder, tokenizer


def _require_chatglm_config(config: Path) -> None:
    """KolorsFolderError unless `config` is a ChatGLM config.json (model_type "chatglm"): the other
    language models kept in models/LLM (Llama, Mistral...) have config.json and tokenizer.model too."""
    from .files import read_json_object
    from .kolors_files import KolorsFolderError

    try:
        model_type = read_json_object(config, "download ChatGLM3's config.json again").get("model_type")
    except (OSError, ValueError) as exc:
        raise KolorsFolderError(str(exc)) from None
    if model_type != "chatglm":
        raise KolorsFolderError(f"{config.parent} is not ChatGLM3 (its config.json says model_type {model_type!r}, "
                                f"not 'chatglm'); pass Kolors' ChatGLM3 (a Kolors folder, its text_encoder/ or "
                                f"chatglm3-fp16.safetensors)")


KOLORS_CHATGLM = "chatglm3-6b-base"  # what Kolors' text_encoder/config.json names as its source


def other_chatglm(weights: Path) -> str | None:
    """The model a ChatGLM folder's config.json names (`_name_or_path`) when it is a ChatGLM other than
    Kolors' ChatGLM3-6B-Base (e.g. THUDM/chatglm3-6b, the chat model: the same shapes, other weights), else
    None (a single file, or a name that says nothing, such as a local path)."""
    from .files import read_json_object

    if not weights.is_dir():
        return None
    try:
        named = str(read_json_object(weights / "config.json", "").get("_name_or_path") or "")
    except (OSError, ValueError):
        return None
    last = named.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    return named if last.startswith("chatglm") and not last.startswith(KOLORS_CHATGLM) else None  # -int4 copies too


# what from_pretrained reads from a ChatGLM3 folder, in its order ({v}: the variant, `_weights_variant`)
_WEIGHT_FILES = ("model{v}.safetensors", "model.safetensors.index{v}.json", "pytorch_model{v}.bin",
                 "pytorch_model.bin.index{v}.json")


def _require_weights(folder: Path) -> None:
    """KolorsFolderError unless `folder` holds ChatGLM3's weights whole: the weights file that
    from_pretrained reads, or every shard its *.index.json lists (a download of the JSON files alone
    has the index but no shard)."""
    from .files import read_json_object
    from .kolors_files import KolorsFolderError

    variant = _weights_variant(folder)
    for name in (n.format(v=f".{variant}" if variant else "") for n in _WEIGHT_FILES):
        index = folder / name
        if not index.is_file():
            continue
        if not name.endswith(".json"):
            return
        try:
            weight_map = read_json_object(index, "download it again").get("weight_map")
        except (OSError, ValueError) as exc:
            raise KolorsFolderError(str(exc)) from None
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [str(s) for s in shards if not (folder / str(s)).is_file()] or (["any shard"] if not shards else [])
        if missing:
            what = missing[0] + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            raise KolorsFolderError(f"{folder} lacks {what} of the ChatGLM3 weights listed in {name}: download "
                                    f"them into {folder.name}/ (Kwai-Kolors/Kolors), or use another ChatGLM3 "
                                    f"(chatglm3-fp16.safetensors) or a precomputed prompt cache")
        return
    raise KolorsFolderError(f"{folder} holds no ChatGLM3 weights (model.safetensors, pytorch_model.bin or the "
                            f"shards of their *.index.json): download them into {folder.name}/ (Kwai-Kolors/Kolors), "
                            f"or use another ChatGLM3 (chatglm3-fp16.safetensors) or a precomputed prompt cache")


def list_text_encoders(*dirs, problems: list[str] | None = None) -> list[Path]:
    """Folders and ChatGLM3 `.safetensors` files under `dirs` (e.g. ComfyUI's models/LLM and
    models/diffusers, their sub-folders too as ComfyUI lists them: `kolors_files.walk_folders`) from
    which `find_text_encoder` can load ChatGLM3, in order: each folder's entries by name, the folders
    level by level, 8-bit files after full-precision ones and another ChatGLM than Kolors' (`other_chatglm`)
    last; a missing or unreadable folder is skipped.
    Files are read directly under `dirs` whatever their names, below them when named .safetensors /
    .sft; in a model folder (`kolors_files.is_model_folder`) only such files, not shards, and none in a
    usable ChatGLM3 folder (they are its parts). Why a ChatGLM3 file or folder cannot be used (no
    tokenizer, 4-bit, weights missing) is appended to `problems`."""
    from .chatglm_file import quantized_bits
    from .kolors_files import is_model_folder, walk_folders

    found, eight_bit = {}, set()
    for root in map(Path, dirs):
        if not root.is_dir():
            continue
        for folder in (root, *walk_folders(root)):
            if folder in found:
                continue
            try:
                entries = sorted(folder.iterdir())
                model_folder = folder != root and is_model_folder(folder)
            except OSError:  # unreadable (another user's)
                continue
            for sub in entries:
                try:
                    if sub in found or not _maybe_chatglm(sub, folder == root, model_folder):
                        continue
                    find_text_encoder(sub)  # a 4-bit file is refused here, not after the user chose it
                    if sub.is_file() and quantized_bits(sub) == 8:
                        eight_bit.add(sub)
                except OSError as exc:  # KolorsFolderError (why it cannot be used), or unreadable
                    if problems is not None and _says_chatglm(sub) and str(exc) not in problems:
                        problems.append(str(exc))
                    continue
                found[sub] = None
    # stable: the order above otherwise
    return sorted(found, key=lambda p: (other_chatglm(p) is not None, p in eight_bit))


def _maybe_chatglm(entry: Path, at_root: bool, in_model_folder: bool) -> bool:
    """Whether `list_text_encoders` tries `entry`: a folder (not a model folder's part), or a ChatGLM3
    safetensors file as ComfyUI lists them (any name directly under a root; no shard of a model folder)."""
    from .chatglm_file import is_chatglm_file
    from .streaming import SAFETENSORS_SUFFIXES

    if entry.is_dir():
        return not in_model_folder
    if in_model_folder and "-of-" in entry.name:
        return False
    named = at_root or entry.name.lower().endswith(SAFETENSORS_SUFFIXES)
    return named and is_chatglm_file(entry)


def _says_chatglm(entry: Path) -> bool:
    """Whether `entry` presents itself as ChatGLM3 (a ChatGLM3 file, or a folder whose config.json says
    chatglm), so that why it cannot be used is worth saying; other models kept beside it are not."""
    try:
        if entry.is_file():
            return True
        _require_chatglm_config(entry / "config.json")
    except (OSError, ValueError):
        return False
    return True


def text_encoder_device(name: str | torch.device = "auto", compute: str | torch.device = "cpu",
                        free_bytes: int | None = None) -> torch.device:
    """Where ChatGLM3 runs. "auto": the compute device when it is a GPU with at least CHATGLM_BYTES
    free (`free_bytes`, queried when None), else the CPU (bf16, a few minutes, once)."""
    if name != "auto":
        from .devices import resolve_device_setting

        return resolve_device_setting(name, "--text-encoder-device", "text_encoder_device_name")
    compute = torch.device(compute)
    if compute.type != "cuda":
        return torch.device("cpu")
    if free_bytes is None:
        from .devices import free_memory

        free_bytes = free_memory(compute)
    return compute if free_bytes >= CHATGLM_BYTES else torch.device("cpu")


def chatglm_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype ChatGLM3 runs in by default on `device`: fp16 on a GPU (Kolors' own choice, closest to the
    conditioning Kolors was trained with), bf16 on the CPU (where fp16 is slow and poorly supported)."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def _weights_variant(folder: Path) -> str | None:
    """"fp16" for a folder that holds only fp16-variant weights (Kolors-diffusers' text_encoder/:
    model.fp16-0000N-of-0000M.safetensors and model.safetensors.index.fp16.json), else None."""
    plain = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if any((folder / name).is_file() for name in plain):
        return None
    return "fp16" if any(folder.glob("*.fp16*")) else None


def _load_chatglm(weights: Path, dtype: torch.dtype):
    """ChatGLM3 from a folder (diffusers' `from_pretrained`) or one `.safetensors` file
    (`chatglm_file`), its weights streamed in `dtype`; ValueError when any weight is missing."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from safetensors import SafetensorError

    from .chatglm_file import load_chatglm_file

    if weights.is_file():
        return load_chatglm_file(weights, dtype)
    try:
        encoder, info = ChatGLMModel.from_pretrained(weights, torch_dtype=dtype, low_cpu_mem_usage=True,
                                                     output_loading_info=True, variant=_weights_variant(weights))
    except SafetensorError as exc:  # a truncated or damaged shard
        raise ValueError(f"{weights}: ChatGLM3's weights are truncated or damaged ({exc}); re-download "
                         f"text_encoder/ (Kwai-Kolors/Kolors) and compute the prompt cache again") from None
    params = dict(encoder.named_parameters())  # a missing buffer (e.g. rotary inv_freq) is rebuilt at init
    missing = sorted(k for k in info.get("missing_keys", ()) if k in params)
    if missing:
        raise ValueError(f"{weights}: ChatGLM3's weights are incomplete ({len(missing)} tensors missing, e.g. "
                         f"{missing[0]}); re-download text_encoder/ (Kwai-Kolors/Kolors) and compute the "
                         f"prompt cache again")
    if any(t.dtype != dtype for t in encoder.parameters()):
        encoder.to(dtype)  # transformers before 4.50 keeps the folder's own dtype (Kolors': fp16)
    return encoder


def compute_prompt_cache_from_kolors(kolors_dir: str | Path, prompt: str = HEATMAP_PROMPT, max_length: int = 256,
                                     time_ids: tuple[float, ...] = SDXL_TIME_IDS,
                                     device: str | torch.device = "cpu",
                                     dtype: torch.dtype | None = None) -> PromptCache:
    """Load ChatGLM3 (any layout `find_text_encoder` accepts), compute the cache, free the encoder.

    The encoder is built on the meta device and its weights streamed in `dtype` (low peak RAM); None
    (`chatglm_dtype`): fp16 on a GPU, as Kolors runs it, bf16 on the CPU (about 12.5 GB either way).
    The encoder is freed when this returns or raises: an error keeps no frame that holds it.
    """
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    from .chatglm_file import quantized_bits
    from .finite import first_problem

    weights, tokenizer_dir = find_text_encoder(kolors_dir)
    try:
        tokenizer = ChatGLMTokenizer.from_pretrained(tokenizer_dir)
    except RuntimeError as exc:  # sentencepiece cannot parse the model
        raise ValueError(f"{tokenizer_dir / 'tokenizer.model'}: not a readable tokenizer ({exc}); download "
                         f"ChatGLM3's tokenizer/ (Kwai-Kolors/Kolors) again") from None
    find_word_columns(tokenizer, prompt, "text", max_length)  # a prompt that does not fit: said before loading
    other = other_chatglm(weights)
    if other:
        log.warning("%s is %s (its config.json says so), not Kolors' text encoder, ChatGLM3-6B-Base (THUDM/%s): the "
                    "same shapes but other weights, so the prompt conditioning computed from it is not the one TADiSR "
                    "was trained with and the output will differ; use Kolors' text_encoder/ or "
                    "chatglm3-fp16.safetensors", weights, other, KOLORS_CHATGLM)
    encoder = _load_chatglm(weights, dtype or chatglm_dtype(device))
    try:
        encoder = encoder.to(device).eval()
        cache = compute_prompt_cache(encoder, tokenizer, prompt, max_length, time_ids)
        if weights.is_file() and quantized_bits(weights) == 8:
            cache.note = f"computed from the 8-bit ChatGLM3 {weights.name}, close to the fp16 weights' conditioning"
        elif other:
            cache.note = f"computed from {other} ({weights}), not Kolors' ChatGLM3-6B-Base"
        bad = first_problem({"prompt_embeds": cache.prompt_embeds, "text_embeds": cache.text_embeds})
        if bad:
            on_cpu = named("--text-encoder-device cpu", "text_encoder_device_name='cpu'")
            raise ValueError(f"{weights}: ChatGLM3's prompt embedding {bad[0]} {bad[1]} (computed on {device}); "
                             f"its weights are damaged: re-download text_encoder/ (Kwai-Kolors/Kolors) or the "
                             f"ChatGLM3 file, or compute on the CPU ({on_cpu})")
        return cache
    except BaseException as exc:
        # the traceback's finished frames (the forward pass's) still hold the encoder: drop their locals
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        del encoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
