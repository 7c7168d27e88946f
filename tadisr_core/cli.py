"""Command line: `tadisr COMMAND ...` (the same as `python -m tadisr_core COMMAND ...`).

Commands: upscale, prompt-cache, inspect, convert, make-tiny. Training lives in the `training`
package, which this one never imports: `tadisr-train`, `tadisr-evaluate`, `tadisr-synthesize`
(= `python -m training.train` / `.evaluate` / `.synthesize`); `tadisr train` etc. say so.

Each command is one `add_<name>(subparsers)` function that builds its sub-parser and sets
`run=<function(args) -> exit code>`; list it in COMMANDS to enable it.

Exit codes (every tadisr command, the training ones included):
    0 success, 1 some inputs failed (or, for inspect, the checkpoint does not fit),
    2 setup error: arguments, missing / unreadable / damaged weight files, unwritable output,
    130 cancelled (Ctrl-C, SIGTERM). Under a launcher (torchrun, accelerate launch), `upscale`'s rank 0
    reports for every rank and exits with the run's code; the other ranks exit 0 once they handed it
    their records.
Environment: TADISR_MODEL, TADISR_KOLORS, TADISR_UNET, TADISR_VAE, TADISR_TEXT_ENCODER, TADISR_CHECKPOINT,
TADISR_PROMPT_CACHE (defaults of the weight flags: they fill what the command line leaves out, and the
command line wins over them; TADISR_KOLORS_DIR is still read as an old name of TADISR_KOLORS),
TADISR_MAX_PIXELS (input size limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from .wording import command_line

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_CANCELLED = 0, 1, 2, 130

log = logging.getLogger("tadisr")


class SetupError(Exception):
    """A problem to report in one line (no traceback) with exit code 2."""


# -- shared helpers -------------------------------------------------------------------------------
def _tile_batch(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return n


def _setup_logging(verbose: bool) -> None:
    """Our log on stderr: warnings, and with -v (`verbose`) details and the tracebacks of unexpected
    failures (logged at debug level beside their one-line error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False


def _finite_float(value: str) -> float:
    import math

    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return x


def _quality(value: str) -> int:
    try:
        q = int(value)
    except ValueError:
        q = 0
    if not 1 <= q <= 100:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 100, got {value!r}")
    return q


def _scale(value: str) -> float:
    from .descriptor import DESCRIPTOR

    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    try:
        DESCRIPTOR.check_scale(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return s


class FromEnv(str):
    """A flag's value that came from its environment variable (`var`), not from the command line: the
    command line wins over it (`_given`, `_settle_model`)."""

    var: str


def env_default(var: str) -> FromEnv | None:
    """$`var` as a flag's default, marked as coming from the environment (None when unset or empty)."""
    value = os.environ.get(var)
    if not value:
        return None
    marked = FromEnv(value)
    marked.var = var
    return marked


def flag_label(flag: str, value: str | None) -> str:
    """How an error names where `value` came from: `flag`, or its variable for a `FromEnv` value."""
    return f"{value.var} (environment)" if isinstance(value, FromEnv) else flag


def kolors_from_env(note: bool = True) -> FromEnv | None:
    """$TADISR_KOLORS, or the old name $TADISR_KOLORS_DIR (with a deprecation `note`), marked with the
    variable it came from."""
    if os.environ.get("TADISR_KOLORS"):
        return env_default("TADISR_KOLORS")
    if os.environ.get("TADISR_KOLORS_DIR") and note:
        print("note: TADISR_KOLORS_DIR is deprecated; set TADISR_KOLORS instead", file=sys.stderr)
    return env_default("TADISR_KOLORS_DIR")


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """--model / --kolors / --checkpoint / --prompt-cache ..., defaulting to TADISR_MODEL / _KOLORS / ... (as
    `FromEnv` values: the command line wins over them)."""
    p.add_argument("--model", metavar="demo|demo-release|RUN_DIR|CHECKPOINT", default=env_default("TADISR_MODEL"),
                   help="'demo' (the small shipped model; 'demo-release' is its release-layout twin), a training "
                        "run folder, one of its checkpoints/step_N folders, a folder written by "
                        "training.export_model or a checkpoint file; a checkpoint that holds adapters only "
                        "needs its Kolors base: its run's recorded one, or --kolors (which replaces it), "
                        "--unet / --vae [env TADISR_MODEL]")
    p.add_argument("--kolors", metavar="DIR", default=kolors_from_env(),
                   help="Kwai-Kolors/Kolors diffusers folder (unet/, vae/; text_encoder/ + tokenizer/ only to "
                        "build the prompt cache) [env TADISR_KOLORS]")
    p.add_argument("--unet", metavar="FILE|DIR", default=env_default("TADISR_UNET"),
                   help="Kolors UNet file (diffusers or SGM names, e.g. models/unet/*.safetensors; an all-in-one "
                        "checkpoint brings its VAE) or folder; overrides the --kolors folder's unet/ [env TADISR_UNET]")
    p.add_argument("--vae", metavar="FILE|DIR", default=env_default("TADISR_VAE"),
                   help="SDXL VAE file (diffusers or LDM names, e.g. models/vae/sdxl_vae.safetensors) or folder; "
                        "overrides the --kolors folder's vae/ [env TADISR_VAE]")
    p.add_argument("--text-encoder", metavar="DIR|FILE", default=env_default("TADISR_TEXT_ENCODER"),
                   help="ChatGLM3 for a missing prompt cache: a ChatGLM3 folder (models/LLM/...), a text_encoder "
                        "folder with its tokenizer, or chatglm3-fp16.safetensors with its tokenizer beside it or in "
                        "a Kolors node pack; default: the --kolors folder [env TADISR_TEXT_ENCODER]")
    p.add_argument("--text-encoder-device", default="auto",
                   help="where ChatGLM3 computes a missing prompt cache: auto (the GPU when it has ~14 GB free, "
                        "else the CPU), cpu, cuda, ...")
    p.add_argument("--checkpoint", metavar="PATH", default=env_default("TADISR_CHECKPOINT"),
                   help="TADiSR checkpoint: the release's tadisr_kolors_ftsr_526000.pkl "
                        "(huqiming513/TADiSR-Models) or a native .safetensors [env TADISR_CHECKPOINT]")
    p.add_argument("--prompt-cache", metavar="PATH", default=env_default("TADISR_PROMPT_CACHE"),
                   help="prompt-embedding cache (.safetensors); computed with Kolors' ChatGLM3 and saved there "
                        "when missing; omitted: computed once and kept in ~/.cache/tadisr/prompt (or "
                        "$TADISR_PROMPT_CACHE_DIR) [env TADISR_PROMPT_CACHE]")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --compile / --channels-last / --merge-lora."""
    from .devices import DTYPE_CHOICES

    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 on CUDA with bf16, fp16 on older CUDA and on mps (VAE kept fp32; fp32 for a "
                        "--model that runs alone, such as the demo, trained in fp32), fp32 on CPU; "
                        "fp8_e4m3fn: UNet weights stored in fp8, computed in bf16 (half the UNet's VRAM)")
    p.add_argument("--offload", default="none", choices=("none", "sequential"),
                   help="sequential: keep weights in RAM and move each block to the GPU as it runs (small GPUs)")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the LoRA weights into the base weights (default; faster, equal within float "
                        "rounding); --no-merge-lora keeps them separate")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the VAE / mask-decoder blocks (for GPUs: the first tile of each "
                        "size compiles for minutes; not with --offload sequential)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (often faster on GPU)")


@command_line()
def load_model(args: argparse.Namespace, prompt_once: Callable | None = None):
    """Load and configure the model from the weight and device arguments; SetupError on missing weights.
    `prompt_once`: how the prompt conditioning is computed, as in `loading.load_tadisr` (under a
    launcher, `Ranks.from_rank0`: rank 0 alone loads ChatGLM3)."""
    import torch

    from .devices import check_compile, place_model, resolve_device, resolve_dtype

    if not (args.model or args.kolors or args.checkpoint or args.unet or args.vae):
        from .model_ref import NO_WEIGHTS_HELP

        raise SetupError(NO_WEIGHTS_HELP)
    _settle_model(args)
    if not args.model and not args.kolors and not args.unet:
        raise SetupError("--kolors DIR (or --unet FILE and --vae FILE) is required (or set TADISR_KOLORS): the "
                         "Kwai-Kolors/Kolors folder (diffusers layout) from https://huggingface.co/Kwai-Kolors/Kolors")
    if not args.model and not args.checkpoint:
        raise SetupError("--checkpoint PATH is required (or set TADISR_CHECKPOINT): tadisr_kolors_ftsr_526000.pkl "
                         "from https://huggingface.co/huqiming513/TADiSR-Models, or a native .safetensors")
    from .model_ref import load_model as load_model_ref
    from .model_ref import resolve_model, runs_alone

    try:
        if isinstance(args.model, FromEnv):  # named as the user set it, not as a --model they never typed
            resolve_model(args.model, given_as=f"{args.model.var} (environment)")
        check_compile(args.compile, args.offload)
        device = resolve_device(args.device)
        alone = bool(args.model) and runs_alone(args.model)
        dtype = resolve_dtype(args.dtype, device, fp16_safe=not alone)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SetupError(str(exc)) from None
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("fp16 on the CPU is slow and poorly supported; prefer --dtype fp32 or bf16")
    from .checkpoint import CheckpointError, with_cli_advice
    from .kolors_identity import NotKolorsError
    from .loading import load_tadisr
    from .ranks import LauncherError

    _quiet_libraries(messages=not args.verbose, progress=getattr(args, "quiet", False))
    try:
        if args.model:
            prompt_cache = _given(args.prompt_cache) if alone else args.prompt_cache
            model = load_model_ref(args.model, prompt_cache=prompt_cache, dtype=dtype, device=device,
                                   merge_lora_weights=args.merge_lora, offload=args.offload,
                                   prompt_once=prompt_once, **_base_weight_args(args, alone))
        else:
            model = load_tadisr(args.kolors, args.checkpoint, args.prompt_cache, dtype=dtype, device=device,
                                merge_lora_weights=args.merge_lora, unet=args.unet, vae=args.vae,
                                text_encoder=args.text_encoder, text_encoder_device_name=args.text_encoder_device,
                                offload=args.offload, prompt_once=prompt_once,
                                prompt_given_as=(flag_label("--prompt-cache", args.prompt_cache),
                                                 "--text-encoder DIR|FILE"))
    except LauncherError:  # the other processes' matter (`run_upscale` says it), not the weights'
        raise
    except (CheckpointError, NotKolorsError, OSError, ValueError) as exc:  # weight files: missing, unreadable, wrong
        # where a UNet given as --checkpoint goes; which variable or flag named the file
        raise SetupError(_name_the_source(with_cli_advice(exc), args)) from None
    except Exception as exc:  # noqa: BLE001 - anything else from the loaders is still one line (-v: traceback)
        log.debug("model loading failed", exc_info=True)
        raise SetupError(f"cannot load the model ({type(exc).__name__}: {exc}); run with -v for details") from None
    return place_model(model, None, None, channels_last=args.channels_last, compile=args.compile)


# The weight flags, most specific first: a --kolors folder's path is part of its unet/'s.
_WEIGHT_FLAGS = ("--unet", "--vae", "--text-encoder", "--prompt-cache", "--checkpoint", "--kolors")
_FLAGS_TO_NAME = ("--unet", "--vae", "--text-encoder")  # their files' errors ("unet weights not found") name no flag


def _name_the_source(message: str, args: argparse.Namespace) -> str:
    """`message` of a weight-file error led by where the file it names came from: its environment variable
    (set long ago, maybe for another model), or the flag when the message would not say it."""
    for flag in _WEIGHT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value and str(Path(value)) in message:
            named = isinstance(value, FromEnv) or flag in _FLAGS_TO_NAME
            return f"{flag_label(flag, value)}: {message}" if named else message
    return message


def _given(value: str | None) -> str | None:
    """A weight flag's value when it was given on the command line; None when it only came from its
    environment variable (set for the Kolors model), which `--model` ignores where it does not apply."""
    return None if isinstance(value, FromEnv) else value


def _settle_model(args: argparse.Namespace) -> None:
    """Keep one of --model and --checkpoint when both have a value: the command line wins over the
    environment (the other value is dropped); SetupError when both come from the same one."""
    if not (args.model and args.checkpoint):
        return
    from_env = [isinstance(value, FromEnv) for value in (args.model, args.checkpoint)]
    if from_env == [True, True]:
        raise SetupError(f"give either --model or --checkpoint, not both: {args.model.var} and "
                         f"{args.checkpoint.var} are both set; give one on the command line or unset the other")
    if from_env == [False, False]:
        raise SetupError("give either --model or --checkpoint, not both")
    if from_env[0]:
        args.model = None
    else:
        args.checkpoint = None


def _base_weight_args(args: argparse.Namespace, alone: bool) -> dict:
    """The base-weight flags for `model_ref.load_model`. For a model that runs alone, values that only
    came from their environment variables are dropped: given on the command line, they are an error there."""
    given = {arg: (_given(getattr(args, flag)) if alone else getattr(args, flag))
             for flag, arg in (("kolors", "kolors_dir"), ("unet", "unet"), ("vae", "vae"),
                               ("text_encoder", "text_encoder"))}
    return {**given, "text_encoder_device_name": args.text_encoder_device}


def _quiet_libraries(messages: bool = True, progress: bool = False) -> None:
    """Silence diffusers / transformers info and cast warnings (`messages`; our own log stays) and
    their progress bars (`progress`, for -q)."""
    for name in ("diffusers", "transformers"):
        try:
            logging_ = __import__(name).utils.logging
            if messages:
                logging_.set_verbosity_error()
            if progress:
                logging_.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


class _Interrupt:
    """First Ctrl-C asks to stop after the current tile batch; a second one, or SIGTERM, aborts at once.

    With `term_stops` (under a launcher) SIGTERM is a first Ctrl-C too: torchrun sends it to every process
    when one of them dies, and each then has its grace period to hand its records to rank 0's report."""

    def __init__(self, term_stops: bool = False) -> None:
        self.requested = False
        self._previous = None
        self._term_stops = term_stops

    def __enter__(self) -> "_Interrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._previous_term = signal.signal(signal.SIGTERM, self._handle if self._term_stops else self._terminate)
        except ValueError:  # not the main thread
            self._previous = self._previous_term = None
        return self

    @staticmethod
    def _terminate(signum, frame) -> None:
        raise Terminated  # unwinds through the writers' cleanup: no hidden partial files stay

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        why = "the launcher stops this process (SIGTERM: another one stopped?)" if signum == signal.SIGTERM else ""
        print(f"\nstopping after the current tiles{': ' + why if why else ' (Ctrl-C again to abort)'}",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if signal.getsignal(signal.SIGTERM) in (self._terminate, self._handle):  # SIG_IGN set meanwhile stays
                signal.signal(signal.SIGTERM, self._previous_term)

    def __call__(self) -> bool:
        return self.requested


def ensure_writable_folder(folder: Path) -> None:
    """Create `folder` and prove it takes a file, before any model is loaded (SetupError otherwise)."""
    import tempfile

    from .files import folder_target_problem
    from .images import is_image_file

    if problem := folder_target_problem(folder, f"-o {folder}"):
        raise SetupError(problem)
    if not folder.exists() and is_image_file(folder):  # `-o result.png` would make a folder of that name
        raise SetupError(f"-o {folder} names a file, but -o is the output folder (NAME_x4.png is written into it): "
                         "give a folder, or make this one first to use it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tadisr-write-test-"):
            pass
    except OSError as exc:
        raise SetupError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None


# -- upscale ----------------------------------------------------------------------------------------
def add_upscale(sub) -> None:
    """`tadisr upscale`: image files and folders -> upscaled images and text masks (`run_upscale`)."""
    from .color import COLOR_FIX_CHOICES
    from .descriptor import DESCRIPTOR
    from .images import DEFAULT_QUALITY, OUTPUT_FORMATS

    p = sub.add_parser("upscale", help="super-resolve image files and write SR images + text masks",
                       description="Super-resolve images: writes <name>_x<scale>.png (.jpg / .webp with --format) "
                                   "and <name>_text_mask.png (and <name>_attention.png with --attention) to OUTDIR.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    add_weight_args(p)
    size = DESCRIPTOR.size
    p.add_argument("--scale", type=_scale, default=size.default_scale,
                   help=f"upscale factor, {size.min_scale:g} to {size.max_scale:g} (default {size.default_scale:g})")
    p.add_argument("--tile", type=int, default=size.default_tile,
                   help=f"tile size in output pixels, multiple of {size.tile_multiple} (default {size.default_tile})")
    p.add_argument("--overlap", type=int, default=size.default_overlap,
                   help=f"tile overlap in output pixels (default {size.default_overlap})")
    p.add_argument("--tile-batch", type=_tile_batch, default="auto",
                   help="tiles per forward pass, or auto (from free memory; halved on out-of-memory)")
    add_device_args(p)
    p.add_argument("--seed", type=int, default=None,
                   help="sample the VAE latent with this seed, as the release did (default: the latent mean, "
                        "deterministic)")
    p.add_argument("--attention", action="store_true", help="also write the text-attention heat map")
    p.add_argument("--no-mask", dest="mask", action="store_false",
                   help="write the image only: skips the text-mask decoder (faster; the image is the same)")
    p.add_argument("--color-fix", choices=COLOR_FIX_CHOICES, default="auto",
                   help="wavelet: keep the input's colours (low frequencies of the bicubic upscale) under the "
                        "model's detail; none: the model's output as it is; auto (default): wavelet for the "
                        "shipped demo models (they shift colours), none for the others")
    p.add_argument("--format", dest="image_format", choices=tuple(OUTPUT_FORMATS), default="png",
                   help="file format of the upscaled image (default png; the text mask stays PNG): jpg and webp "
                        "take a fraction of the space at --quality (jpg cannot keep an alpha channel)")
    p.add_argument("--quality", type=_quality, default=DEFAULT_QUALITY,
                   help=f"JPEG / WebP quality, 1 to 100 (default {DEFAULT_QUALITY}; WebP at 100 is lossless)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose outputs all exist (complete, made from the same input by the same "
                        "model, colour fix and seed); without it "
                        "TADiSR's own earlier outputs are replaced (files it did not write never are)")
    p.add_argument("--json", action="store_true", help="print a JSON report (per-file sizes and timings) to stdout")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no closing summary (errors are still printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (tile batch, retries)")
    p.set_defaults(run=run_upscale)


def _validate_upscale(args) -> None:
    from .descriptor import DESCRIPTOR
    from .images import ImageReadError, max_pixels_limit
    from .pipeline import check_settings

    size = DESCRIPTOR.size
    try:
        check_settings(args.scale, args.tile, args.overlap, min_tile=size.min_tile)
    except ValueError as exc:
        hint = ""
        if str(exc).startswith("overlap") and args.overlap == size.default_overlap:  # a --tile below it
            hint = (f" (the default --overlap): give a smaller one with --tile {args.tile}, e.g. --overlap "
                    f"{args.tile // 4}")
        raise SetupError(f"--{exc}{hint}") from None
    _check_chatglm_device("--text-encoder-device", args.text_encoder_device)
    _check_file_target(flag_label("--prompt-cache", args.prompt_cache), args.prompt_cache)
    try:
        max_pixels_limit()  # checked once here, not once per image after the model loaded
    except ImageReadError as exc:
        raise SetupError(str(exc)) from None


def _check_file_target(flag: str, path: str | None) -> None:
    """SetupError when the prompt cache file to write, given as `flag`, cannot be written (an existing
    folder, or a file where its folder must be): said before ChatGLM3 computes it (minutes), not when saved."""
    from .files import file_target_problem

    if path is not None and (problem := file_target_problem(path, flag, "prompt.safetensors")):
        raise SetupError(problem)


def _check_chatglm_device(flag: str, value: str) -> None:
    """SetupError unless `value`, given as `flag` for where ChatGLM3 runs, is auto or a device this
    machine has: said before the 6 B-parameter model loads, not after."""
    if value == "auto":
        return
    from .devices import resolve_device_setting

    try:
        resolve_device_setting(value, flag, flag)
    except (RuntimeError, ValueError) as exc:
        raise SetupError(str(exc)) from None


@command_line()
def run_upscale(args: argparse.Namespace, *, cancel: Callable[[], bool] | None = None, model=None) -> int:
    """The `upscale` command. `cancel` / `model` let callers (tests, embedding) inject their own.

    Under a launcher (torchrun, `accelerate launch`) rank 0 plans the inputs for every rank and reports
    for the whole run (`ranks.py`); the other ranks return 0 once their records are handed over."""
    from .ranks import LauncherError, Rank0Failed, joined_ranks

    _setup_logging(args.verbose)
    _validate_upscale(args)
    try:
        with joined_ranks() as ranks:
            try:
                return _upscale_files(args, ranks, cancel, model)
            except SetupError as exc:
                if ranks.rank == 0:
                    raise
                raise SetupError(f"rank {ranks.rank} of {ranks.world}: {exc}") from None
    except Rank0Failed as exc:  # rank 0 prints its error; this rank only says why it stops
        print(exc, file=sys.stderr)
        return EXIT_SETUP
    except LauncherError as exc:
        raise SetupError(str(exc)) from None


def _plan_upscale(args: argparse.Namespace) -> list:
    """The inputs' jobs (every rank's), after checking there is something to upscale and the output
    folder takes files; SetupError otherwise."""
    from .batch import collect_inputs, plan_jobs

    found = collect_inputs(args.inputs, args.recursive, exclude=args.output)
    if not found:  # the warnings before it say what the walk left out (sub-folders, files named like outputs)
        raise SetupError(f"nothing to upscale: no image files in {' '.join(map(str, args.inputs))}")
    if all(error for _, _, error in found):  # no input exists (a typo?): said before the model loads
        errors = [error for _, _, error in found]
        raise SetupError("; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else ""))
    planned = plan_jobs(found, args.output, args.scale, args.attention, mask=args.mask, image_format=args.image_format)
    ensure_writable_folder(Path(args.output))
    return planned


def _load_for_upscale(args: argparse.Namespace, new_folders: list[Path], prompt_once: Callable | None = None):
    """`load_model`; on a SetupError or a stop (Ctrl-C, SIGTERM) the output folders this run made
    (`new_folders`) are removed again."""
    try:
        return load_model(args, prompt_once)
    except (SetupError, KeyboardInterrupt):
        for folder in new_folders:  # leave no empty folders behind a run that never started
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _check_attention_columns(model, args: argparse.Namespace) -> None:
    """SetupError when --attention asks for the text attention but the prompt cache has no column to read
    it from: said once before the first image, not once per image."""
    if not args.attention:
        return
    try:
        model.prompt.columns(model.spec.attention.token)
    except ValueError as exc:
        raise SetupError(f"{exc}: --attention needs it; compute the prompt cache from Kolors' ChatGLM3 with "
                         f"`tadisr prompt-cache --kolors DIR -o FILE`") from None


def _upscale_files(args: argparse.Namespace, ranks, cancel: Callable[[], bool] | None, model) -> int:
    from tqdm.auto import tqdm

    from .batch import DiskFull, Options, made_by, not_tried, process_file, shard
    from .pipeline import UpscaleCancelled

    rank, world = ranks.rank, ranks.world
    output = Path(args.output)
    new_folders = [p for p in (output, *output.parents) if not p.exists()]  # what ensure_writable_folder makes
    t0 = time.perf_counter()
    planned = ranks.from_rank0(lambda: _plan_upscale(args))
    jobs = shard(planned, rank, world)
    quiet = args.quiet or rank > 0
    if rank > 0:
        ensure_writable_folder(output)  # made by rank 0; proved writable here too (another node's mount)
    if model is None:  # a prompt to compute (and save, for --prompt-cache) is computed by rank 0 alone
        model = _load_for_upscale(args, new_folders if rank == 0 else [], ranks.from_rank0)
    _check_attention_columns(model, args)
    load_s = time.perf_counter() - t0
    options = Options(args.scale, args.tile, args.overlap, args.tile_batch, args.attention, args.seed,
                      args.skip_existing, args.color_fix, args.quality)
    options.made_by = made_by(model, options)
    records, cancelled = [], False
    files_bar = tqdm(total=len(jobs), unit="file", disable=quiet or len(jobs) < 2, position=0)
    with _Interrupt(term_stops=world > 1) as interrupt:
        stop = cancel or interrupt
        for k, job in enumerate(jobs):
            bars = []  # made at the first tile: a file skipped or failed before its tiles shows no empty bar

            def progress(done: int, total: int, bars=bars, job=job) -> None:
                if not bars:
                    bars.append(tqdm(total=total, unit="tile", desc=job.input.name, leave=False, disable=quiet,
                                     position=1 if len(jobs) > 1 else 0))
                bars[0].total, bars[0].n = total, done
                bars[0].refresh()

            try:
                rec = process_file(model, job, options, progress=progress, cancel=stop)
            except UpscaleCancelled as exc:
                cancelled = True
                print(f"cancelled during {job.input} ({exc}); its outputs were not written. The same command with "
                      f"--skip-existing goes on from it, keeping what was written", file=sys.stderr)
                break
            except DiskFull as exc:  # every later file would fail alike, each after its whole upscale
                rec, full = exc.record, job.image.parent
            else:
                full = None
            finally:
                for bar in bars:
                    bar.close()
            records.append(rec)
            files_bar.update(1)
            if not rec.ok:
                tqdm.write(f"error: {rec.error}", file=sys.stderr)
            if full is not None:
                later = jobs[k + 1:]
                records += [not_tried(j, f"the run stopped when the disk holding {full} filled up") for j in later]
                if later:
                    tqdm.write(f"error: stopped: {len(later)} file(s) not tried", file=sys.stderr)
                break
        files_bar.close()
        share = {"rank": rank, "records": records, "cancelled": cancelled, "device": str(model.device),
                 "model_load_seconds": round(load_s, 4), "total_seconds": round(time.perf_counter() - t0, 4)}
        if world > 1:
            with contextlib.suppress(ValueError):  # not the main thread
                # all written: the launcher's stop signal, sent to every rank when one exits (rank 0 with 1 for
                # a failed file, a crashed rank), must cost neither this rank's handing over nor rank 0's report
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # still under _Interrupt: a Ctrl-C to the process group while this rank waits for the others' shares
        # asks them to stop instead of aborting this rank (and losing the whole run's report)
        shares = ranks.gather(share)
    if shares is None:  # another rank's: rank 0 reports, and its exit code is the run's
        return EXIT_OK
    lost = [r for r, s in enumerate(shares) if s is None]
    shares = [s for s in shares if s is not None]
    _report_upscale(args, model, shares, len(planned), quiet, lost, world)
    if lost:  # the others were cancelled because of it, by the launcher: a failed run, not the user's stop
        return EXIT_FAILED
    if any(s["cancelled"] for s in shares):
        return EXIT_CANCELLED
    return EXIT_FAILED if any(not r.ok for s in shares for r in s["records"]) else EXIT_OK


LISTED_FAILURES = 20   # failed files the closing summary names one by one (--json lists all)


def _report_upscale(args: argparse.Namespace, model, shares: list[dict], planned: int, quiet: bool,
                    lost: list[int], world: int) -> None:
    """Rank 0's report for the whole run (`shares`: the records of every rank of `world` but the `lost`
    ones, which stopped without handing theirs over): the --json document on stdout, or one summary
    line on stderr that counts the reported files, followed by the failed files (the first
    `LISTED_FAILURES`); a line on stderr names the lost ranks in either case."""
    records = [(s["rank"], r) for s in shares for r in s["records"]]
    failures = [(rank, r) for rank, r in records if not r.ok]
    failed = [r for _, r in failures]
    if lost:
        ranks, whose = (f"ranks {', '.join(map(str, lost))}", "their") if len(lost) > 1 else (f"rank {lost[0]}", "its")
        print(f"error: {ranks} of {world} stopped without reporting (killed or crashed; see {whose} output): {whose} "
              f"files are not counted here, though some may have been written", file=sys.stderr)
    if args.json:
        import dataclasses

        import torch

        from .lowvram import stored_dtype

        report = {"ok": len(records) - len(failed), "failed": len(failed),
                  "cancelled": any(s["cancelled"] for s in shares), "planned": planned, "world_size": world,
                  "device": shares[0]["device"], "dtype": str(stored_dtype(model.unet)).replace("torch.", ""),
                  "threads": torch.get_num_threads(), "model_load_seconds": shares[0]["model_load_seconds"],
                  "total_seconds": max(s["total_seconds"] for s in shares),
                  **({"ranks": [{k: v for k, v in s.items() if k != "records"} | {"files": len(s["records"])}
                                for s in shares], "lost_ranks": list(lost)} if world > 1 else {}),
                  "files": [dataclasses.asdict(r) | {"rank": rank} for rank, r in records]}
        print(json.dumps(report), flush=True)
    elif not quiet:
        skipped = sum(r.skipped for _, r in records)
        processes = f" by {world} processes" if world > 1 else ""
        print(f"{len(records) - len(failed) - skipped} of {planned} files written to {args.output}{processes}"
              + (f", {skipped} skipped (their outputs exist)" if skipped else "")
              + (f", {len(failed)} failed" if failed else ""), file=sys.stderr)
        paged = [r.input for _, r in records if r.ok and (r.frames or 1) > 1]
        if paged:  # said per file as it was read, maybe long ago: the summary is what a batch's user reads
            print(f"  {len(paged)} file(s) had several frames or pages, of which only the first was upscaled: "
                  + ", ".join(paged[:3]) + (", ..." if len(paged) > 3 else ""), file=sys.stderr)
        for rank, r in failures[:LISTED_FAILURES]:
            print(f"  failed{f' (rank {rank})' if world > 1 else ''}: {r.error}", file=sys.stderr)
        if len(failures) > LISTED_FAILURES:
            print(f"  and {len(failures) - LISTED_FAILURES} more failed; --json lists them all", file=sys.stderr)


@command_line()
def run_prompt_cache(args) -> int:
    """Compute the prompt cache once with Kolors' ChatGLM3 (a folder or a single file) and save it."""
    from .backbone import KolorsFolderError
    from .prompt import compute_prompt_cache_from_kolors

    _setup_logging(args.verbose)
    if args.kolors is None:
        raise SetupError("--kolors DIR|FILE is required (the Kwai-Kolors/Kolors diffusers folder, or ChatGLM3)")
    _check_chatglm_device("--device", args.device)
    _check_file_target("-o", args.output)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise SetupError(f"{out} exists; pass --force to overwrite it")
    from .descriptor import dtype_name
    from .devices import DTYPES, is_oom, resolve_device
    from .prompt import chatglm_dtype, text_encoder_device

    _quiet_libraries(messages=not args.verbose)  # transformers' notices about ChatGLM3's remote-code layout
    device, dtype = args.device, args.dtype
    try:
        device = text_encoder_device(args.device, resolve_device("auto"))
        if dtype == "auto":
            dtype = dtype_name(chatglm_dtype(device))
        cache = compute_prompt_cache_from_kolors(args.kolors, args.prompt, args.tokens,
                                                 tuple(args.time_ids), device, DTYPES[dtype])
    except (KolorsFolderError, OSError, ValueError) as exc:  # missing, unreadable or wrong Kolors files
        raise SetupError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - anything else from the loaders is still one line (-v: traceback)
        log.debug("computing the prompt cache failed", exc_info=True)
        if is_oom(exc):
            raise SetupError(_chatglm_memory_advice(str(device), dtype)) from None
        raise SetupError(f"cannot compute the prompt cache from --kolors {args.kolors} ({type(exc).__name__}: "
                         f"{exc}); check its ChatGLM3 files (text_encoder/, tokenizer/) or download them again"
                         + ("" if args.verbose else "; run with -v for the traceback")) from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cache.save(out)
    except OSError as exc:
        raise SetupError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {out}: prompt {cache.prompt!r}, 'text' at column(s) {list(cache.text_columns)}")
    return EXIT_OK


def _chatglm_memory_advice(device: str, dtype: str) -> str:
    """What to do when ChatGLM3 ran out of memory computing the prompt cache on `device` in `dtype`."""
    cpu = device.startswith("cpu")
    need = (f"ChatGLM3 in {dtype} needs about {'25' if dtype == 'fp32' else '12.5'} GB of "
            f"{'RAM' if cpu else 'GPU memory'}" + (" (half that with --dtype auto)" if dtype == "fp32" else ""))
    if cpu:
        return (f"out of memory computing the prompt cache on the CPU: {need}; close other programs to free "
                f"memory, or compute it on a GPU with --device cuda")
    return (f"out of memory computing the prompt cache on {device}: {need}; free GPU memory (other programs or "
            f"jobs), or compute it on the CPU with --device cpu")


def add_prompt_cache(sub) -> None:
    """`tadisr prompt-cache`: encode the prompt with ChatGLM3 once and save it (`run_prompt_cache`)."""
    from .devices import COMPUTE_DTYPES
    from .spec import HEATMAP_PROMPT, SDXL_TIME_IDS

    p = sub.add_parser("prompt-cache", help="compute the prompt-embedding cache once with Kolors' ChatGLM3",
                       description="Encode the fixed TADiSR prompt with Kolors' ChatGLM3 and save the UNet "
                                   "conditioning, so inference never loads the 6 B-parameter text encoder.")
    p.add_argument("--kolors", metavar="DIR|FILE", default=kolors_from_env(),
                   help="Kwai-Kolors/Kolors diffusers folder (text_encoder/ + tokenizer/), a ChatGLM3 folder "
                        "(e.g. models/LLM/chatglm3-6b-base), a text_encoder folder holding its tokenizer, or a single "
                        "ChatGLM3 file (models/LLM/chatglm3-fp16.safetensors: its tokenizer beside it or in a "
                        "Kolors node pack's configs/tokenizer) [env TADISR_KOLORS]")
    p.add_argument("-o", "--output", required=True, help="where to write the cache (.safetensors)")
    p.add_argument("--prompt", default=HEATMAP_PROMPT, help="the prompt (default: the release's)")
    p.add_argument("--tokens", type=int, default=256, help="sequence length, left-padded (Kolors: 256)")
    p.add_argument("--time-ids", type=_finite_float, nargs=6, default=SDXL_TIME_IDS,
                   metavar=("H", "W", "TOP", "LEFT", "TH", "TW"),
                   help="SDXL size conditioning: original size, crop, target size (default: the 768 tile)")
    p.add_argument("--device", default="cpu",
                   help="where ChatGLM3 runs (~12.5 GB in fp16 or bf16): cpu (default), cuda, or auto (the GPU "
                        "when it has enough free memory, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", *COMPUTE_DTYPES),
                   help="auto: fp16 on a GPU, as Kolors runs ChatGLM3; bf16 on the CPU (fp16 is slow there)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("-v", "--verbose", action="store_true", help="log details, and the traceback of a failure")
    p.set_defaults(run=run_prompt_cache)


def add_checkpoint_commands(sub) -> None:
    """`tadisr inspect` and `tadisr convert` (defined in `checkpoint.add_commands`)."""
    from .checkpoint import add_commands

    add_commands(sub)


def add_make_tiny(sub) -> None:
    """`tadisr make-tiny`: a tiny random model for tests and demos (defined in `testing.add_command`)."""
    from .testing import add_command

    add_command(sub)


TRAINING_COMMANDS = {"train": "training.train", "evaluate": "training.evaluate", "synthesize": "training.synthesize"}


def add_training_pointers(sub) -> None:
    """`tadisr train|evaluate|synthesize`: say where they are (tadisr_core never imports `training`)."""
    for name, module in TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=f"see tadisr-{name} (python -m {module}), in the training package",
                           add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=_training_pointer, pointer=(name, module))


def _training_pointer(args) -> int:
    name, module = args.pointer
    command = " ".join([f"tadisr-{name}", *args.rest])
    raise SetupError(f"`tadisr {name}` belongs to the training package: run `{command}` (or `python -m {module} "
                     f"...`); `tadisr-{name} --help` lists its options")


COMMANDS: list[Callable] = [add_upscale, add_prompt_cache, add_checkpoint_commands, add_make_tiny,
                            add_training_pointers]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of COMMANDS."""
    from .ranks import ArgumentParser

    parser = ArgumentParser(prog="tadisr", description="TADiSR: text-aware 4x super-resolution (Kolors, one step).",
                            epilog="Exit codes: 0 ok, 1 some inputs failed, 2 setup error, 130 cancelled. "
                                   "Training: tadisr-train, tadisr-evaluate, tadisr-synthesize.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding as Ctrl-C does."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the writers' cleanup runs and no temporary file stays behind."""
    def interrupt(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is interrupt:  # SIG_IGN set meanwhile stays
            signal.signal(signal.SIGTERM, previous)


@command_line()
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen command; setup errors print one line and return 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in TRAINING_COMMANDS:  # their options are not ours to parse
            return _training_pointer(argparse.Namespace(pointer=(argv[0], TRAINING_COMMANDS[argv[0]]),
                                                        rest=argv[1:]))
        args = build_parser().parse_args(argv)
        with _terminate_as_interrupt():
            return args.run(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except Terminated:
        from .batch import distributed_rank

        launcher = distributed_rank()[1] > 1
        print("terminated (SIGTERM)" + ("; a launcher sends it to every process when one of them fails: its report "
                                        "names which" if launcher else ""), file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_CANCELLED
