"""Export a finished training run as a standalone model folder (what `tadisr_core/demo/` ships).

    python -m training.export_model RUN_DIR OUT_DIR [--name NAME] [--dtype fp16]

Writes OUT_DIR/NAME.safetensors (NAME by default tadisr_ + OUT_DIR's name: `tadisr_core/demo` gives
tadisr_demo; every tensor, cast to `--dtype`; metadata: the run's step and
config) and OUT_DIR/prompt_cache.safetensors (the run's, or `--prompt-cache`). The run's checkpoint
must hold its backbone (it trained it, `model.train_backbone: true`, had no Kolors base, or took it
from a `model.init_checkpoint` that held one); one that holds adapters only needs the Kolors base and
is not standalone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tadisr_core.devices import COMPUTE_DTYPES
from tadisr_core.wording import command_line

RUN_ARG, OUT_ARG = "RUN_DIR", "OUT_DIR"  # how the usage line and the errors name the two arguments


def default_name(out: Path) -> str:
    """The weights' name an export into `out` gets: tadisr_ + the folder's name (kept when it starts so)."""
    folder = Path(os.path.abspath(out)).name  # the name given: a symbolic link's, not its target's
    return folder if folder.lower().startswith("tadisr") else f"tadisr_{folder}"


def export_run(run: Path, out: Path, name: str | None = None, dtype: str = "fp16",
               prompt_cache: Path | None = None) -> dict[str, Path]:
    """Write the standalone files of `run` into `out`; returns their paths. The weights are `name`.safetensors
    (default `default_name(out)`); the prompt cache is the run's own (or `prompt_cache`); `out` may hold an
    earlier export of the same name, nothing else."""
    from tadisr_core.checkpoint import load_checkpoint, save_native
    from tadisr_core.files import folder_target_problem
    from tadisr_core.loading import warn_of_other_conditioning
    from tadisr_core.model_ref import RUN_CONFIG, RUN_PROMPT_CACHE, resolve_model, standalone_prompt
    from tadisr_core.prompt import PromptCache

    if problem := folder_target_problem(out, f"{OUT_ARG} {out}"):
        raise ValueError(problem)
    name = default_name(out) if name is None else name
    if not name.strip() or name.startswith(".") or any(sep in name for sep in ("/", "\\")):
        raise ValueError(f"--name {name!r}: give a plain file name, not empty, without a folder (no / or \\) and "
                         f"not starting with '.': the weights are written as {OUT_ARG}/NAME.safetensors")
    if f"{name}.safetensors" == RUN_PROMPT_CACHE:
        raise ValueError(f"--name {name}: that is the prompt cache's file name; choose another name")
    others = sorted(p.name for p in out.glob("*.safetensors") if p.name not in (f"{name}.safetensors",
                                                                                 RUN_PROMPT_CACHE))
    if others:
        raise ValueError(f"{OUT_ARG} {out}: already holds another model ({', '.join(others)}); an exported model "
                         f"is one weights file and its {RUN_PROMPT_CACHE}: export into an empty folder"
                         + (f", or replace it with --name {others[0].removesuffix('.safetensors')}"
                            if len(others) == 1 else ""))
    files = resolve_model(run, given_as=RUN_ARG)
    ckpt = load_checkpoint(files.checkpoint)
    if not ckpt.includes_backbone:
        raise ValueError(f"{files.checkpoint} holds adapters only: it runs only on the Kolors base it was "
                         f"trained on, so it is not exported standalone")
    source = standalone_prompt(files, prompt_cache)
    prompt = PromptCache.load(source)
    warn_of_other_conditioning(ckpt, prompt, source, own_cache=True)  # the export then records the given one
    groups = {g: {k: v.to(COMPUTE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
              for g, sd in ckpt.groups.items()}
    run = files.run or Path(run)  # a step folder or checkpoint of a run: the run's own folder
    config = ckpt.metadata.get("training_config")  # its own: the run's config.json is the last start's
    if config is None:  # weights saved before they carried it
        config = (run / RUN_CONFIG).read_text() if (run / RUN_CONFIG).is_file() else "{}"
    meta = {k: v for k, v in ckpt.metadata.items() if k in ("train_step", "backbone")}
    meta.update({"exported_from": run.name, "stored_dtype": dtype, "training_config": json.dumps(json.loads(config))})
    out.mkdir(parents=True, exist_ok=True)
    weights = save_native(groups, ckpt.spec, out / f"{name}.safetensors", meta, prompt)
    prompt_path = out / RUN_PROMPT_CACHE
    prompt.save(prompt_path)
    return {"weights": weights, "prompt_cache": prompt_path}


@command_line()
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m training.export_model", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar=RUN_ARG, type=Path,
                   help="the training run's output_dir (or one of its step folders or checkpoint files)")
    p.add_argument("out", metavar=OUT_ARG, type=Path, help="folder to write the standalone model into")
    p.add_argument("--name", help="weights file name, without .safetensors (a plain name: no folder; default "
                                  "tadisr_ + OUT_DIR's name)")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="fp16", help="stored precision (default fp16)")
    p.add_argument("--prompt-cache", type=Path, help="the prompt cache it was trained with (default: the run's)")
    args = p.parse_args(argv)
    try:
        paths = export_run(args.run, args.out, args.name, args.dtype, args.prompt_cache)
    except (OSError, ValueError) as e:  # missing, a folder for a file, permission denied, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    for what, path in paths.items():
        print(f"{what}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
