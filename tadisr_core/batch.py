"""Batch upscaling of image files: input discovery, output naming, sharding, one file at a time.

Used by the `upscale` CLI command. A file that cannot be read or processed is recorded as failed
and the others still run; outputs of a file appear only once the whole file succeeded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .images import is_image_file, load_image, save_images
from .pipeline import UpscaleCancelled, upscale

log = logging.getLogger("tadisr")


@dataclass
class Job:
    """One input file and the paths its outputs go to."""

    input: Path
    image: Path
    mask: Path
    attention: Path | None = None
    error: str | None = None          # set when the input cannot even be found


@dataclass
class Options:
    """Per-file upscale settings (see `pipeline.upscale`)."""

    scale: float = 4.0
    tile: int = 768
    overlap: int = 256
    tile_batch: int | str = "auto"
    attention: bool = False
    seed: int | None = None           # set: sample the latent with this seed (as the release did)
    skip_existing: bool = False
    color_fix: str = "none"           # "wavelet": colours from the bicubic input (color.py)


@dataclass
class Record:
    """What happened to one file (printed by `--json`)."""

    input: str
    ok: bool
    error: str | None = None
    skipped: bool = False
    input_size: list[int] | None = None      # [width, height]
    output_size: list[int] | None = None
    channels: int | None = None
    tiles: int | None = None
    tile_size: list[int] | None = None       # [width, height] of the tiles actually used
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def scale_tag(scale: float) -> str:
    """"x4" for 4, "x2.5" for 2.5."""
    return f"x{scale:g}"


def collect_inputs(inputs: list[str | Path], recursive: bool = False) -> list[tuple[Path, Path | None, str | None]]:
    """Expand files and folders into (file, folder it came from, error) in a stable order.

    Folders contribute their image files (sorted; all levels with `recursive`); a missing path is
    returned with an error so it is reported like an unreadable file.
    """
    found: list[tuple[Path, Path | None, str | None]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            files = sorted(p for p in pattern if p.is_file() and is_image_file(p) and not p.name.startswith("."))
            if not files:
                log.warning("no image files in folder %s", path)
            found.extend((p, path, None) for p in files)
        elif path.is_file():
            found.append((path, None, None))
        else:
            found.append((path, None, f"input not found: {path}"))
    return found


def plan_jobs(inputs: list[tuple[Path, Path | None, str | None]], outdir: str | Path, scale: float,
              attention: bool = False) -> list[Job]:
    """Output paths `<name>_x<scale>.png`, `<name>_text_mask.png` (and `<name>_attention.png`).

    Files found in folders keep their sub-folder below OUTDIR; a name already taken gets `-2`, `-3`...
    """
    outdir = Path(outdir)
    used: set[Path] = set()
    jobs = []
    tag = scale_tag(scale)
    for path, root, error in inputs:
        sub = path.parent.relative_to(root) if root is not None else Path()
        stem, n = path.stem, 1
        while (outdir / sub / stem) in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(outdir / sub / stem)
        base = outdir / sub
        jobs.append(Job(path, base / f"{stem}_{tag}.png", base / f"{stem}_text_mask.png",
                        base / f"{stem}_attention.png" if attention else None, error))
    return jobs


def shard(jobs: list, rank: int, world: int) -> list:
    """This process's share: every `world`-th job starting at `rank`."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world size {world}")
    return jobs[rank::world]


def process_file(model, job: Job, options: Options, *, progress: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> Record:
    """Load, upscale and save one file. Failures become a failed Record; cancellation propagates."""
    rec = Record(str(job.input), ok=False)
    if job.error:
        rec.error = job.error
        return rec
    outputs = {"image": job.image, "mask": job.mask}
    if job.attention is not None:
        outputs["attention"] = job.attention
    if options.skip_existing and all(p.exists() for p in outputs.values()):
        rec.ok, rec.skipped = True, True
        rec.outputs = {k: str(v) for k, v in outputs.items()}
        return rec
    t0 = time.perf_counter()
    try:
        image = load_image(job.input)
        t1 = time.perf_counter()
        rec.input_size = [image.shape[-1], image.shape[-2]]
        rec.channels = image.shape[1]
        result = upscale(model, image, options.scale, options.tile, options.overlap, options.tile_batch,
                         progress=progress, cancel=cancel, attention=options.attention,
                         sample=options.seed is not None, seed=options.seed, color_fix=options.color_fix)
        del image
        t2 = time.perf_counter()
        items = [(result.image, job.image), (result.mask, job.mask)]
        if job.attention is not None:
            items.append((result.attention, job.attention))
        save_images(items)
        t3 = time.perf_counter()
    except UpscaleCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.seconds["total"] = round(time.perf_counter() - t0, 4)
        log.debug("failed on %s", job.input, exc_info=True)
        return rec
    rec.ok = True
    rec.output_size = [result.image.shape[-1], result.image.shape[-2]]
    if result.grid is not None:
        rec.tiles = len(result.grid)
        rec.tile_size = [result.grid.tile_w, result.grid.tile_h]
    rec.outputs = {k: str(v) for k, v in outputs.items()}
    rec.seconds = {"load": round(t1 - t0, 4), "upscale": round(t2 - t1, 4), "save": round(t3 - t2, 4),
                   "total": round(t3 - t0, 4)}
    return rec


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (`accelerate launch`, torchrun); (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return (rank, world) if world > 1 else (0, 1)
