"""The optimiser step alone: torch's AdamW as a per-tensor loop, foreach and fused, on a spec's trainable set.

    OMP_NUM_THREADS=2 python benchmarks/bench_optimizer_step.py --spec demo   # every demo weight, as demo*.yaml
    python benchmarks/bench_optimizer_step.py --spec tiny --steps 2           # smoke mode

The trainer uses the fused form (`training.builders.build_optimizer`). The parameters get fixed random
gradients; each form starts from the same weights, and the largest difference of its weights from the
loop's after the timed steps is reported with its time. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.builders import build_model_from_config, configure_trainable  # noqa: E402
from training.config import Config  # noqa: E402

FORMS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def bench(spec: str, steps: int, warmup: int) -> dict:
    """Seconds per AdamW step for each form, and each form's largest weight difference from the loop's."""
    cfg = Config()
    cfg.model.size = spec
    model = build_model_from_config(cfg, "cpu")
    params = [p for _, p in configure_trainable(model, backbone=True)]  # as the demo configs: every weight
    g = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    out = {"spec": spec, "threads": torch.get_num_threads(), "tensors": len(params),
           "parameters": sum(p.numel() for p in params), "steps_timed": steps}
    finals = {}
    for form, kwargs in FORMS.items():
        for p, s, grad in zip(params, start, grads):
            p.data.copy_(s)
            p.grad = grad
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kwargs)
        for _ in range(warmup):
            opt.step()
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        out[f"{form}_s_per_step"] = round((time.perf_counter() - t) / steps, 4)
        finals[form] = [p.detach().clone() for p in params]
    for form in ("foreach", "fused"):
        diffs = (float((a - b).abs().max()) for a, b in zip(finals[form], finals["loop"]))
        out[f"{form}_max_diff_from_loop"] = max(diffs)
    return out


def main(argv=None) -> int:
    """Run the benchmark and print its JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="demo", choices=("demo", "tiny"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per form (mean reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the optimiser state is allocated)")
    args = p.parse_args(argv)
    print(json.dumps(bench(args.spec, args.steps, args.warmup), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
