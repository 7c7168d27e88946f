"""Batch upscaling of image files: input discovery, output naming, sharding, one file at a time.

Used by the `upscale` CLI command. A file that cannot be read or processed is recorded as failed
and the others still run; outputs of a file appear only once the whole file succeeded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from .descriptor import DESCRIPTOR
from .images import (
    DEFAULT_QUALITY,
    OUTPUT_FORMATS,
    check_writable,
    image_size,
    left_out_advice,
    name_max,
    read_image,
    recorded_source,
    save_images,
    scaled_dpi,
    walk_images,
    written_by_us,
)
from .pipeline import UpscaleCancelled, output_size, upscale

log = logging.getLogger("tadisr")


@dataclass
class Job:
    """One input file and the paths its outputs go to."""

    input: Path
    image: Path
    mask: Path | None                 # None: image only (the text-mask decoder is skipped)
    attention: Path | None = None
    error: str | None = None          # set when the input cannot even be found
    source: str | None = None         # the input's name, size and time, recorded in its outputs (source_tag)
    shared: bool = False              # another input has its name: outputs must record this one to count


@dataclass
class Options:
    """Per-file upscale settings (see `pipeline.upscale`)."""

    scale: float = DESCRIPTOR.size.default_scale
    tile: int = DESCRIPTOR.size.default_tile
    overlap: int = DESCRIPTOR.size.default_overlap
    tile_batch: int | str = "auto"
    attention: bool = False
    seed: int | None = None           # set: sample the latent with this seed (as the release did)
    skip_existing: bool = False
    color_fix: str = "auto"           # "wavelet": colours from the bicubic input; "auto": the model's choice (color.py)
    quality: int = DEFAULT_QUALITY    # of a JPEG or WebP image (plan_jobs' image_format)
    made_by: str = ""                 # what makes the outputs (`made_by`), recorded with the input's tag


def made_by(model, options: Options) -> str:
    """A digest of what decides a file's outputs besides its input, name and scale: the model's weights (their
    files' identities) and the colour fix and seed. Outputs record it, so `--skip-existing` redoes those that
    another model (the demo, say) or other settings made."""
    made = repr((getattr(model, "weights_id", None), options.color_fix, options.seed))
    return hashlib.sha256(made.encode()).hexdigest()[:12]


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
    frames: int | None = None                # frames or pages of the input; only the first is upscaled
    tiles: int | None = None
    tile_size: list[int] | None = None       # [width, height] of the tiles actually used
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def scale_tag(scale: float) -> str:
    """"x4" for 4, "x2.5" for 2.5."""
    return f"x{scale:g}"


MASK_SUFFIX = "_text_mask.png"  # the text mask's name: the input's output name + this, whatever the scale
# ComfyUI's Save Image adds its counter to a prefix (`a_text_mask_00001_.png`; the example workflows' prefixes
# give `text_mask_00001_.png`, `used_mask_00001_.png`, `heatmap_00001_.png`): taken for masks and heat maps, whose
# names say what they are, never for an SR image (`ComfyUI_00001_.png` is what many users upscale)
OUTPUT_NAME = re.compile(rf"_(x\d+(\.\d+)?(-\d+)?\.({'|'.join(OUTPUT_FORMATS)})"
                         rf"|(text_mask|attention)(-\d+)?(_\d{{5,}}_)?\.png)$"
                         rf"|^(text_mask|used_mask|heatmap|attention)_\d{{5,}}_\.png$", re.IGNORECASE)
OUTPUT_PATTERNS = ("*_x4.png / .jpg / .webp (any scale: *_x2.png, *_x2.5.png), *_text_mask.png, *_attention.png, "
                   "the demo's NAME_strip.png beside its NAME_x4.png, and the masks and heat maps ComfyUI's Save "
                   "Image wrote: *text_mask_00001_.png, used_mask_00001_.png, heatmap_00001_.png")
STRIP_SUFFIX = "_strip.png"  # the demo's comparison strip: an output only beside its SR image (not comic_strip.png)


def looks_like_output(path: str | Path) -> bool:
    """Whether a file name follows the pattern of our outputs (`OUTPUT_PATTERNS`; the demo's strips, known by
    the SR image beside them, are added by `output_files`)."""
    return bool(OUTPUT_NAME.search(Path(path).name))


def collect_inputs(inputs: list[str | Path], recursive: bool = False,
                   exclude: str | Path | None = None) -> list[tuple[Path, Path | None, str | None]]:
    """Expand files and folders into (file, folder it came from, error) in a stable order.

    Folders contribute their image files (sorted; all levels with `recursive`, following symlinked
    sub-folders once); files named like our outputs and the folder `exclude` (the output folder) are
    left out of folder walks, so a re-run never upscales its own results. Files named explicitly are
    always taken, each file once. A missing or unreadable path is returned with an error, reported like a
    bad file.
    """
    found: list[tuple[Path, Path | None, str | None]] = []
    exclude = Path(exclude) if exclude is not None else None
    for raw in inputs:
        path = Path(raw)
        try:
            os.stat(path)
        except PermissionError:
            found.append((path, None, f"permission denied: {path}"))
            continue
        except OSError:
            found.append((path, None, f"input not found: {path}"))
            continue
        if path.is_dir():
            walk = walk_images(path, recursive, exclude)
            outputs = output_files(walk.files)
            if outputs:
                log.warning("%s: left out %d file(s) named like outputs (%s); name them explicitly to upscale them",
                            path, len(outputs), OUTPUT_PATTERNS)
            if walk.others:
                names = ", ".join(p.name for p in sorted(walk.others)[:3]) + (", ..." if len(walk.others) > 3 else "")
                log.warning("%s: left out %d file(s) that are not images we read (%s)%s", path, len(walk.others),
                            names, left_out_advice(walk.others))
            if walk.subfolders:
                log.warning("%s: %d sub-folder(s) not searched; add --recursive to upscale the images in them",
                            path, walk.subfolders)
            left_out = set(outputs)
            files = [p for p in walk.files if p not in left_out]
            if not files:
                log.warning("no image files in folder %s", path)
            found.extend((p, path, None) for p in files)
        else:
            found.append((path, None, None))
    return _once_each(found)


def output_files(files: list[Path]) -> list[Path]:
    """Those of `files` that are our outputs (`OUTPUT_PATTERNS`): named like one (`looks_like_output`), or a
    demo strip, `NAME_strip.png` beside the `NAME_x4.png` it shows."""
    names = {(p.parent, p.name) for p in files}
    return [p for p in files if looks_like_output(p) or (
        p.name.endswith(STRIP_SUFFIX) and (p.parent, p.name.removesuffix(STRIP_SUFFIX) + "_x4.png") in names)]


def _once_each(found: list[tuple[Path, Path | None, str | None]]) -> list[tuple[Path, Path | None, str | None]]:
    """`found` with each file once (the first time it comes): a file named twice, or a folder and one of
    its files, is upscaled once, with a warning."""
    seen: set[str] = set()
    kept, repeated = [], []
    for entry in found:
        path, _, error = entry
        real = os.path.realpath(path)
        if error is None and real in seen:
            repeated.append(path)
            continue
        seen.add(real)
        kept.append(entry)
    if repeated:
        names = ", ".join(map(str, repeated[:3])) + (", ..." if len(repeated) > 3 else "")
        log.warning("%d input(s) given more than once, upscaled once: %s", len(repeated), names)
    return kept


def plan_jobs(inputs: list[tuple[Path, Path | None, str | None]], outdir: str | Path, scale: float,
              attention: bool = False, mask: bool = True, image_format: str = "png") -> list[Job]:
    """Output paths `<name>_x<scale>.<image_format>` (png, jpg or webp), `<name>_text_mask.png` (and
    `<name>_attention.png`); the mask and the heat map are always PNG, exact.

    Files found in folders keep their sub-folder below OUTDIR; a name already taken (ignoring case) gets
    `-2`, `-3`...
    An input keeps the name whose outputs an earlier run made from it (its image at this scale and
    format, or its text mask, records it), so names do not move when files of the same name (`a.png`,
    `a.jpg`) join or leave the inputs, nor when the format or the scale changes.
    """
    outdir = Path(outdir)
    tag = scale_tag(scale)
    suffix = f"_{tag}.{image_format}"
    earlier: dict[Path, dict[str, list[str]]] = {}

    def earlier_names(base: Path, stem: str) -> list[str]:
        """The names of `stem`'s family (`stem`, `stem-2`...) with an image or mask output in `base`, in order."""
        if base not in earlier:
            family: dict[str, set[tuple[int, str]]] = {}
            with contextlib.suppress(OSError):
                for name in os.listdir(base):
                    end = next((e for e in (suffix, MASK_SUFFIX) if name.endswith(e)), None)
                    if end is not None:
                        taken = name[:-len(end)]
                        family.setdefault(taken, set()).add((1, taken))
                        if numbered := re.fullmatch(r"(.+)-(\d+)", taken):
                            family.setdefault(numbered[1], set()).add((int(numbered[2]), taken))
            earlier[base] = {k: [name for _, name in sorted(v)] for k, v in family.items()}
        return earlier[base].get(stem, [])

    def recorded(base: Path, stem: str) -> set[str]:
        """The inputs `stem`'s outputs in `base` record (`source_tag`s; none for no outputs, or older ones)."""
        return {r for r in (recorded_source(base / f"{stem}{suffix}"), recorded_source(base / f"{stem}{MASK_SUFFIX}"))
                if r is not None}

    def made_from(base: Path, stem: str, source: str, edited: bool = False) -> bool:
        """Whether `stem`'s outputs were made from the file `source` (in any folder: a moved folder keeps its
        outputs), or, `edited`, from an earlier version of the file at its path."""
        return any(_same_file(r, source) or (edited and _same_path(r, source)) for r in recorded(base, stem))

    def another_inputs(base: Path, stem: str, source: str | None) -> bool:
        """Whether `stem`'s outputs were made from another file (of another name, or another folder's): they
        are not `source`'s to replace."""
        return any(not _same_file(r, source) and not _same_path(r, source, or_older=True)
                   for r in recorded(base, stem))

    placed = [(path, outdir / (path.parent.relative_to(root) if root is not None else Path()), error,
               source_tag(path) if error is None else None) for path, root, error in inputs]
    in_run = Counter(_name_key(base, path.stem) for path, base, _, _ in placed)
    used: set[str] = set()  # _name_key of the names given so far
    kept_names: set[Path] = set()
    stems: list[str | None] = []
    for path, base, _, source in placed:  # first, the names an earlier run gave these inputs
        # compared exactly: outputs that exist side by side (Scan_x4.png, scan_x4.png) are two files on this disk
        kept = next((stem for edited in (False, True) for stem in earlier_names(base, path.stem)
                     if source is not None and base / stem not in kept_names
                     and made_from(base, stem, source, edited)), None)
        if kept is not None:
            kept_names.add(base / kept)
            used.add(_name_key(base, kept))
        stems.append(kept)
    jobs = []
    for (path, base, error, source), stem in zip(placed, stems):
        if stem is None:
            stem = next(s for s in _stems(path) if _name_key(base, s) not in used
                        and not another_inputs(base, s, source))
            used.add(_name_key(base, stem))
        # outputs that record no input (older versions) are taken as this input's only where no other
        # file of its name is in the run or has outputs
        shared = in_run[_name_key(base, path.stem)] > 1 or len(earlier_names(base, path.stem)) > 1
        jobs.append(Job(path, base / f"{stem}{suffix}", base / f"{stem}{MASK_SUFFIX}" if mask else None,
                        base / f"{stem}_attention.png" if attention else None, error, source, shared))
    _refuse_overwrites(jobs)
    return jobs


def _name_key(base: Path, stem: str) -> str:
    """How planned output names are compared: ignoring case, as macOS, Windows and exFAT do, so `Scan.png`
    and `scan.png` never get two names that are one file there."""
    return str(base / stem).casefold()


def _stems(path: Path):
    """The output names an input may take, in order: its stem, then `stem-2`, `stem-3`..."""
    yield path.stem
    n = 2
    while True:
        yield f"{path.stem}-{n}"
        n += 1


def source_tag(path: Path) -> str | None:
    """What an output records of its input: its file name (percent-encoded: any bytes, in ASCII), size,
    modification time and a digest of its folder's real path (which tells `x/page.png` from `y/page.png`
    without writing the path into the file); None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    folder = hashlib.sha256(os.fsencode(os.path.realpath(path.parent))).hexdigest()[:12]
    return f"{quote(os.fsencode(path.name))} {st.st_size} bytes {int(st.st_mtime)} in {folder}"


def _tag_parts(tag: str | None) -> tuple[str, str | None, str | None]:
    """A `source_tag` (with `made_by` after " by ") as (file: "NAME SIZE bytes TIME", folder digest, made_by);
    None for the parts a tag of an older version lacks (" in ", " by ")."""
    rest, _, made = (tag or "").partition(" by ")
    file, _, folder = rest.partition(" in ")
    return file, folder or None, made or None


def _same_file(recorded: str, source: str | None) -> bool:
    """Whether `recorded` names the same file as `source`: name, size and time (in any folder)."""
    return source is not None and _tag_parts(recorded)[0] == _tag_parts(source)[0]


def _same_path(recorded: str, source: str | None, or_older: bool = False) -> bool:
    """Whether `recorded` and `source` are one path: the same name in the same folder (its content may have
    changed since); with `or_older`, also a tag of an older version (no folder) of the same name: it may be."""
    (file, folder, _), (now, here, _) = _tag_parts(recorded), _tag_parts(source)
    same_folder = folder == here if folder is not None else or_older
    return same_folder and file.partition(" ")[0] == now.partition(" ")[0]


def _made_alike(path: Path, source: str | None, made: str, shared: bool) -> bool:
    """Whether the complete output `path` was made from the file `source` by `made` (`made_by`); one that
    records no input (versions before 2026-12-02) counts when no other input shares its name."""
    if not written_by_us(path):
        return False
    recorded = recorded_source(path)
    if recorded is None:
        return not shared
    return _same_file(recorded, source) and _tag_parts(recorded)[2] == (made or None)


def _outputs(job: Job) -> list[Path]:
    return [p for p in (job.image, job.mask, job.attention) if p is not None]


def _refuse_overwrites(jobs: list[Job]) -> None:
    """Mark jobs failed whose outputs would replace an input of this run or a file we did not write, or
    whose names are longer than their disk takes (said before the upscale, not after)."""
    inputs = {os.path.realpath(j.input): j.input for j in jobs if j.error is None}
    for job in jobs:
        if job.error:
            continue
        for out in _outputs(job):
            longest = name_max(out.parent)
            if len(os.fsencode(out.name)) > longest:
                job.error = (f"{out.name}: the output's name is {len(os.fsencode(out.name))} bytes, longer than "
                             f"the {longest} its disk takes (in {out.parent}); give the input a shorter name")
                break
            if os.path.realpath(out) in inputs:
                job.error = (f"{out} is also an input of this run; it would be overwritten before it is read. "
                             f"Choose another output folder (-o)")
                break
            if out.exists() and not written_by_us(out, complete=False):
                job.error = (f"{out} exists and was not written by TADiSR; it is left alone. Move it or choose "
                             f"another output folder (-o)")
                break


def shard(jobs: list, rank: int, world: int) -> list:
    """This process's share: every `world`-th job starting at `rank`."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world size {world}")
    return jobs[rank::world]


def _mask_fits(job: Job) -> bool:
    """Whether the job's text mask (if any) has its image's size: one left by a run at another scale
    (the mask's name does not carry the scale) does not, and is made again."""
    return job.mask is None or image_size(job.mask) == image_size(job.image)


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})   # a write that every later file would fail the same way


class DiskFull(Exception):
    """A file's outputs could not be written for want of space (`DISK_FULL`); `record` is its failed Record,
    whose error names the folder and what to do. The run stops: every later file would fail alike."""

    def __init__(self, record: Record):
        super().__init__(record.error)
        self.record = record


def _disk_full(exc: BaseException) -> int | None:
    """The errno of `exc` (or an exception it was raised from) when it is one of `DISK_FULL`, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def not_tried(job: Job, reason: str) -> Record:
    """The failed Record of a file the run stopped before (`reason`: why)."""
    return Record(str(job.input), ok=False, error=f"{job.input}: not tried: {reason}")


def process_file(model, job: Job, options: Options, *, progress: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> Record:
    """Load, upscale and save one file. Failures become a failed Record; cancellation propagates, and so
    does a full disk (`DiskFull`, carrying the Record)."""
    rec = Record(str(job.input), ok=False)
    if job.error:
        rec.error = job.error
        return rec
    outputs = {"image": job.image, **({"mask": job.mask} if job.mask is not None else {})}
    if job.attention is not None:
        outputs["attention"] = job.attention
    if options.skip_existing and all(_made_alike(p, job.source, options.made_by, job.shared)
                                     for p in outputs.values()) and _mask_fits(job):
        rec.ok, rec.skipped = True, True
        rec.outputs = {k: str(v) for k, v in outputs.items()}
        return rec
    t0 = time.perf_counter()
    try:
        source = read_image(job.input)
        image = source.pixels
        t1 = time.perf_counter()
        rec.input_size = [image.shape[-1], image.shape[-2]]
        rec.channels, rec.frames = image.shape[1], source.frames
        check_writable(job.image, image.shape[1], output_size(*image.shape[-2:], options.scale))  # before the upscale
        result = upscale(model, image, options.scale, options.tile, options.overlap, options.tile_batch,
                         progress=progress, cancel=cancel, attention=options.attention,
                         sample=options.seed is not None, seed=options.seed, mask=job.mask is not None,
                         color_fix=options.color_fix)
        del image
        t2 = time.perf_counter()
        items = [(result.image, job.image, source.icc_profile)]
        items += [(result.mask, job.mask)] if job.mask is not None else []
        if job.attention is not None:
            items.append((result.attention, job.attention))
        recorded = f"{job.source} by {options.made_by}" if job.source and options.made_by else job.source
        save_images(items, options.quality, recorded, dpi=scaled_dpi(source.dpi, options.scale))
        t3 = time.perf_counter()
    except UpscaleCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        rec.error = str(exc) if str(job.input) in str(exc) else f"{job.input}: {_error_text(exc)}"
        rec.seconds["total"] = round(time.perf_counter() - t0, 4)
        log.debug("failed on %s", job.input, exc_info=True)
        if (code := _disk_full(exc)) is not None:
            rec.error = (f"{job.input}: cannot write its outputs to {job.image.parent}: {os.strerror(code).lower()}; "
                         f"free space there or choose another output folder (-o)")
            raise DiskFull(rec) from exc
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


def _error_text(exc: Exception) -> str:
    """The message of a per-file error; the exception's type name only for unexpected kinds (the project's
    own errors are ValueError / OSError subclasses whose messages say what went wrong)."""
    return str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"


LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT")   # set by torchrun and `accelerate launch` alike


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (`accelerate launch`, torchrun); (0, 1) alone.

    WORLD_SIZE / RANK left over in a shell without a launcher (no MASTER_ADDR / MASTER_PORT) would
    silently drop most files, so they are ignored with a warning; so are values that are not integers.
    """
    world_text = os.environ.get("WORLD_SIZE", "1")
    rank_text = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    try:
        world, rank = int(world_text), int(rank_text)
    except ValueError:
        log.warning("WORLD_SIZE=%r RANK=%r are not integers: stale variables? Ignoring them and processing "
                    "every file in this one process", world_text, rank_text)
        return 0, 1
    if world > 1 and not all(os.environ.get(v) for v in LAUNCHER_VARS):
        log.warning("WORLD_SIZE=%d RANK=%d are set but no launcher is (MASTER_ADDR/MASTER_PORT missing): stale "
                    "variables? Processing every file in this one process", world, rank)
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)
