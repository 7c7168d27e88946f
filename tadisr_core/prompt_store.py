"""Prompt conditioning kept between runs when no prompt-cache path is given: computed once per ChatGLM3,
prompt and time ids, in the user's cache folder, so a later run loads it without ChatGLM3."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from .files import file_identity, user_cache_dir
from .prompt import PromptCache, compute_prompt_cache_from_kolors, find_text_encoder

PROMPT_CACHE_DIR_ENV = "TADISR_PROMPT_CACHE_DIR"
log = logging.getLogger("tadisr")


def kept_cache_path(encoder_source: str | Path, prompt: str, time_ids: tuple[float, ...],
                    max_length: int = 256) -> Path:
    """Where the conditioning of `prompt` and `time_ids` computed with the ChatGLM3 at `encoder_source` (any
    layout `prompt.find_text_encoder` accepts) is kept: named after the encoder and keyed by its files' paths,
    sizes and times (a replaced encoder is computed again). KolorsFolderError when there is no ChatGLM3 there."""
    weights, tokenizer = find_text_encoder(encoder_source)
    files = [weights] if weights.is_file() else sorted(p for p in weights.iterdir() if p.is_file())
    identity = [file_identity(p) for p in (*files, tokenizer / "tokenizer.model")]
    key = json.dumps([identity, prompt, [float(t) for t in time_ids], max_length])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    named = weights.parent if weights.name == "text_encoder" else weights  # Kolors/text_encoder: "Kolors"
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", named.stem) or "chatglm3"
    return user_cache_dir("prompt", PROMPT_CACHE_DIR_ENV) / f"{label}-{digest}.safetensors"


def kept_prompt(encoder_source: str | Path, prompt: str, time_ids: tuple[float, ...], device: torch.device,
                cache_flag: str) -> PromptCache:
    """The conditioning from the cache folder (`kept_cache_path`), else computed with ChatGLM3 on `device`
    and kept there. A kept file that cannot be read is computed again; a folder that cannot be written
    leaves the conditioning in memory, with a warning naming the folder, `PROMPT_CACHE_DIR_ENV` and
    `cache_flag` (the caller's name for a cache path)."""
    path = kept_cache_path(encoder_source, prompt, time_ids)
    if path.is_file():
        try:
            cache = PromptCache.load(path)
            log.info("the prompt conditioning: %s (computed once with ChatGLM3 %s)", path, encoder_source)
            return cache
        except (OSError, ValueError) as exc:  # damaged, or another user's file we may not read
            log.warning("%s; computing it again", exc)
    cache = compute_prompt_cache_from_kolors(encoder_source, prompt=prompt, time_ids=time_ids, device=device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save(path)
    except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own error for a folder it cannot write in
        if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
            raise
        log.warning("the prompt conditioning was computed with ChatGLM3 but cannot be kept in %s (%s): later runs "
                    "compute it again (about 12.5 GB and minutes each time); set %s to a folder you can write, or "
                    "give %s FILE", path.parent, getattr(exc, "strerror", None) or exc, PROMPT_CACHE_DIR_ENV,
                    cache_flag)
        return cache
    log.info("the prompt conditioning is kept in %s: later runs with this ChatGLM3 skip it (%s sets the folder)",
             path, PROMPT_CACHE_DIR_ENV)
    return cache
