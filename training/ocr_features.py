"""Frozen text-recognition features for the legibility loss (``loss.ocr``).

The network is the convolutional backbone of PP-OCR's text recogniser, the ONNX model that ships
inside the ``rapidocr`` wheel (nothing is downloaded): its graph from the image up to the pooling
that collapses the text-line height (stride 16 down, 4 across), run in torch so that gradients reach
the image. ``onnx`` parses the file and a small interpreter runs the eleven operators that part of
the graph uses (onnx2torch would convert it, but it requires torchvision, which we cannot install).
Its squeeze-and-excitation gates average over the whole input, so on a whole tile an error anywhere
moves the features on the text a little (about 0.6 of what the same error on the text does).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training import TRAIN_EXTRA_INSTALL
from training.config import ConfigError

REC_MODEL_GLOB = "*rec*.onnx"


def recognizer_path() -> Path:
    """The recogniser ONNX file inside the installed ``rapidocr`` package; a ConfigError naming loss.ocr
    when rapidocr is missing or holds no single recogniser."""
    try:
        import rapidocr
    except ImportError as e:
        raise ConfigError("loss.ocr needs the rapidocr package (its recogniser): "
                          f"{TRAIN_EXTRA_INSTALL}, or set loss.ocr: 0") from e
    folder = Path(rapidocr.__file__).parent / "models"
    found = sorted(folder.glob(REC_MODEL_GLOB))
    if len(found) != 1:
        raise ConfigError(f"loss.ocr expects one text-recogniser model {REC_MODEL_GLOB} in {folder}, "
                           f"found {[p.name for p in found]}; reinstall rapidocr>=3.0")
    return found[0]


def _same_upper_pads(kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    if any(s != 1 for s in strides):
        raise NotImplementedError("auto_pad SAME_UPPER is supported at stride 1 only")
    total = [(k - 1) * d for k, d in zip(kernel, dilations)]
    return [t // 2 for t in total] + [t - t // 2 for t in total]  # ONNX order: begins, then ends


def _pad(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    top, left, bottom, right = pads
    return F.pad(x, (left, right, top, bottom), value=value) if any(pads) else x


def _pads(attrs: dict, kernel: list[int]) -> list[int]:
    dil = attrs.get("dilations", [1, 1])
    if attrs.get("auto_pad", b"NOTSET") == b"SAME_UPPER":
        return _same_upper_pads(kernel, attrs.get("strides", [1, 1]), dil)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise NotImplementedError(f"auto_pad {attrs['auto_pad']!r}")
    return list(attrs.get("pads", [0, 0, 0, 0]))


def _conv(attrs, x, w, b=None):
    x = _pad(x, _pads(attrs, list(w.shape[2:])))
    return F.conv2d(x, w, b, attrs.get("strides", [1, 1]), 0, attrs.get("dilations", [1, 1]),
                    attrs.get("group", 1))


def _max_pool(attrs, x):
    if attrs.get("ceil_mode", 0):
        raise NotImplementedError("MaxPool ceil_mode")
    kernel = attrs["kernel_shape"]
    return F.max_pool2d(_pad(x, _pads(attrs, kernel), float("-inf")), kernel, attrs.get("strides", kernel))


OPS = {
    "Identity": lambda a, x: x,
    "Add": lambda a, x, y: x + y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Erf": lambda a, x: torch.erf(x),
    "Relu": lambda a, x: torch.relu(x),
    "HardSigmoid": lambda a, x: (a.get("alpha", 0.2) * x + a.get("beta", 0.5)).clamp(0, 1),
    "ReduceMean": lambda a, x: x.mean(dim=tuple(a["axes"]), keepdim=bool(a.get("keepdims", 1))),
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Conv": _conv,
    "MaxPool": _max_pool,
}


class RecognizerFeatures(nn.Module):
    """PP-OCR recogniser backbone as a frozen module: RGB ``[B, 3, H, W]`` in 0..1 ->
    ``[B, C, H/16, W/4]`` features (the recogniser's own preprocessing: BGR, mapped to [-1, 1])."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as e:
            raise ConfigError(f"loss.ocr needs the onnx package (it reads the recogniser): {TRAIN_EXTRA_INSTALL}, "
                              "or set loss.ocr: 0") from e

        path = Path(path) if path else recognizer_path()
        model = onnx.load(str(path))
        pools = [n for n in model.graph.node if n.op_type == "AveragePool"]
        if not pools:
            raise ValueError(f"{path}: no AveragePool, so not a PP-OCR recogniser graph")
        self.input_name = model.graph.input[0].name
        self.output_name = pools[0].input[0]
        sub = onnx.utils.Extractor(model).extract_model([self.input_name], [self.output_name])
        self.nodes = [(n.op_type, list(n.input), n.output[0],
                       {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in sub.graph.node]
        unknown = sorted({op for op, *_ in self.nodes} - set(OPS))
        if unknown:
            raise NotImplementedError(f"{path}: operators {unknown} are not interpreted")
        self.const_names = [t.name for t in sub.graph.initializer]
        for i, t in enumerate(sub.graph.initializer):
            self.register_buffer(f"c{i}", torch.from_numpy(numpy_helper.to_array(t).copy()), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def run_graph(self, x: torch.Tensor) -> torch.Tensor:
        """The graph on an already-preprocessed ``[B, 3, H, W]`` input (BGR in [-1, 1])."""
        env = {name: getattr(self, f"c{i}") for i, name in enumerate(self.const_names)}
        env[self.input_name] = x
        for op, inputs, output, attrs in self.nodes:
            env[output] = OPS[op](attrs, *(env[i] for i in inputs if i))
        return env[self.output_name]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.run_graph(rgb.flip(1) * 2 - 1)
