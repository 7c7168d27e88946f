"""A tiny random TADiSR of the real structure, for tests and weight-free demos.

    python -m tadisr_core.testing make-tiny DIR

writes DIR/kolors/ (a Kolors-layout diffusers folder: unet/, vae/, scheduler/, tokenizer/,
text_encoder/ with a tiny ChatGLM3), DIR/tadisr_tiny.safetensors (native checkpoint),
DIR/tadisr_tiny_official.pkl (the release's pickle layout) and DIR/prompt_cache.safetensors.
Outputs are noise-like: the weights are random. Everything is seeded, so files are reproducible.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .backbone import build_unet, build_vae
from .checkpoint import save_model, save_official, trainable_state_dict
from .files import folder_target_problem
from .model import TADiSRModel
from .spec import HEATMAP_PROMPT, TADiSRSpec, tiny_spec

TINY_FILES = {"checkpoint": "tadisr_tiny.safetensors", "official": "tadisr_tiny_official.pkl",
              "prompt_cache": "prompt_cache.safetensors", "kolors": "kolors"}
_CORPUS = [HEATMAP_PROMPT, "a photo of text on a sign", "best quality text", "highres detailed photo",
           "extremely detailed street sign with text", "quality, resolution, detail, text, sign, photo"]


def _tiny_tokenizer(folder: Path):
    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_CORPUS * 20))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=120,
                                       model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                       pad_id=-1, minloglevel=2)
        tok = ChatGLMTokenizer(vocab_file=str(Path(tmp) / "tok.model"), padding_side="left")
        tok.save_pretrained(str(folder))
    return ChatGLMTokenizer.from_pretrained(str(folder))


def _tiny_text_encoder(folder: Path, hidden: int, seed: int):
    from diffusers.pipelines.kolors import ChatGLMModel

    from .chatglm_file import encoder_config

    cfg = encoder_config(num_layers=2, hidden_size=hidden, ffn_hidden_size=2 * hidden, kv_channels=16,
                         num_attention_heads=hidden // 16, padded_vocab_size=256, multi_query_attention=True,
                         multi_query_group_num=2, add_qkv_bias=True, seq_length=64, original_rope=True)
    model = ChatGLMModel(cfg, empty_init=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ChatGLM skips init: every tensor must be set explicitly
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(str(folder))
    return model


def _randomise_trainables(model: TADiSRModel, seed: int) -> None:
    """Give LoRA B, skip convs and decoder scales non-zero values so each part affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.split(".")[-1] in ("a_l", "a_r", "b_l", "b_r"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_tiny(out: str | Path, spec: TADiSRSpec | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the tiny Kolors folder, checkpoints and prompt cache; returns their paths. The release's
    pickle layout (`official`) is written for the release variant only: it cannot hold the paper one.
    NotADirectoryError when a file stands where `out` must be a folder."""
    from diffusers import EulerDiscreteScheduler

    from .prompt import compute_prompt_cache_from_kolors

    if problem := folder_target_problem(out, f"DIR {out}"):
        raise NotADirectoryError(problem)
    spec = spec or tiny_spec("release")
    out = Path(out)
    kolors = out / TINY_FILES["kolors"]
    torch.manual_seed(seed)
    unet, vae = build_unet(spec.unet), build_vae(spec.vae)
    unet.save_pretrained(str(kolors / "unet"))
    vae.save_pretrained(str(kolors / "vae"))
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.014, num_train_timesteps=1100,
                           beta_schedule="scaled_linear").save_pretrained(str(kolors / "scheduler"))
    _tiny_tokenizer(kolors / "tokenizer")
    _tiny_text_encoder(kolors / "text_encoder", spec.text_hidden, seed)
    prompt = compute_prompt_cache_from_kolors(kolors, max_length=spec.prompt_tokens, dtype=torch.float32,
                                              time_ids=(64, 64, 0, 0, 64, 64))
    prompt.save(out / TINY_FILES["prompt_cache"])
    model = TADiSRModel(spec, unet, vae, prompt)
    _randomise_trainables(model, seed + 1)
    paths = {k: out / v for k, v in TINY_FILES.items()}
    save_model(model, paths["checkpoint"])
    if spec.variant == "release":
        save_official(trainable_state_dict(model), spec, paths["official"])
    else:  # the release's pickle has no room for the paper layout (its tied decoder branches differ)
        del paths["official"]
    return paths


def add_command(sub) -> None:
    """The `make-tiny` sub-command (shared by `tadisr` and `python -m tadisr_core.testing`)."""
    p = sub.add_parser("make-tiny", help="write a tiny random TADiSR (Kolors folder, checkpoints, prompt cache)")
    p.add_argument("dir", help="the folder to write into (made when missing): kolors/, tadisr_tiny.safetensors, "
                               "tadisr_tiny_official.pkl and prompt_cache.safetensors")
    p.add_argument("--variant", choices=("release", "paper"), default="release",
                   help="release: the released checkpoint's layout (default); paper: TACA + CDIB")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.set_defaults(run=run_make_tiny)


def run_make_tiny(args: argparse.Namespace) -> int:
    """Write the tiny model files and list them; a file where DIR must be a folder: one line, exit 2."""
    try:
        paths = make_tiny(args.dir, tiny_spec(args.variant), args.seed)
    except NotADirectoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tadisr_core.testing make-tiny ...` (the same command as `tadisr make-tiny`)."""
    parser = argparse.ArgumentParser(prog="python -m tadisr_core.testing")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
