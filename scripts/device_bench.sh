#!/usr/bin/env bash
# The GPU benchmarks as one prepared run on the lent device machine (one H200, Python 3.12, torch 2.11
# cu130, no network; 15 minutes of device time per session, all calls and the machine's start counted).
#
# Here, before any device time is spent:
#   make device-wheels                                 # .device_wheels/: the 4 wheels the machine lacks (13 MiB)
#   TADISR_BENCH_DRY=1 bash scripts/device_bench.sh    # rehearsal on this CPU: same steps, tiny settings (~2 min)
# Then ONE call of the device tool (run), from the repository root:
#   run(command="bash scripts/device_bench.sh", carry=[".device_wheels"], timeout_s=540)
# A rerun of some parts only, at once while the machine is warm (it goes back 30 s after a call):
#   run(command="PARTS='train_step' EXTRAS='' bash scripts/device_bench.sh", carry=[".device_wheels"], timeout_s=300)
#
# Parts, in order, each under `timeout` (cap), with a rough estimate for the H200 (from the FLOP counts in
# benchmarks/RESULTS.md at 50-150 TFLOP/s achieved, plus builds and imports; nothing measured there yet).
# The whole script keeps to BUDGET_S (default 450 s): a part gets at most what is left of it, a part that
# fails or times out does not stop the next, and the benchmarks rewrite their JSON as they go, so a part
# cut short keeps what it measured. Expected about 5.5 min, at most about 7.8 min (budget, kill grace and
# summary); with the machine's start, 7-10 of the 15 minutes.
#   setup       pip install --no-index --no-deps --target $SITE of the wheels (the image's torch and other
#               packages untouched; $SITE goes first on PYTHONPATH), then the GPU, versions, pyproject's
#               requirements and the imports into run.json                                    ~20 s, cap 180
#   gpu_full    bench_gpu_full.py: tiles 768, 512, 1024 (6 repeats after 2 warm-ups; each stage checked
#               for NaN/inf), then a 1024 -> 4096 upscale with and without the mask (2 repeats each)
#                                                                                            ~100 s, cap 210
#   train_step  bench_train_step.py: 768 px, batch 1, bf16, gradient checkpointing, 8 steps  ~60 s, cap 150
#   lowvram     bench_gpu_lowvram.py: bf16, fp8, fp8 + offload, bf16 + offload, fp16 x tiles 512, 768, 1024
#                                                                                             ~90 s, cap 150
#   extras, only while the budget still holds their whole cap (EXTRAS='' leaves them out):
#   keep_lora   bench_gpu_full.py --keep-lora, tile 768 (the LoRA kept separate)             ~35 s, cap 90
#   fp16        bench_gpu_full.py --dtype fp16, tile 768 (pre-Ampere's dtype; NaNs recorded)  ~35 s, cap 90
# Back in $OUT (7 files): run.json (environment, requirement check, each part's exit status and seconds),
# device_bench.log, gpu_full.json, train_step.json, lowvram.json, gpu_full_keep_lora.json, gpu_full_fp16.json.
# The output's tail ends with the main figures. Exit status 0 when setup and every part that ran exited 0.
#
# TADISR_BENCH_DRY=1: a rehearsal on this machine's CPU with the dev venv (.venv/bin/python); OUT is a new
# folder under /tmp unless set. The wheels are installed into a temporary $SITE for cp312 x86_64 (pip's
# --python-version and --platform) but not put on the path (cp312 binaries do not load here); each part's
# GPU arguments are checked to parse (each benchmark stops with "no CUDA device" right after parsing), then
# the part runs its CPU smoke settings (--smoke, --tiny). PARTS, EXTRAS, BUDGET_S, WHEELS, SITE, PY and
# PEAK_TFLOPS can be set in either mode.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=${TADISR_BENCH_DRY:-0}
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  OUT=${OUT:-$(mktemp -d /tmp/device_bench.XXXXXX)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  PY=${PY:-python3}
  : "${OUT:?OUT is unset: run this through the device tool, or set OUT, or rehearse with TADISR_BENCH_DRY=1}"
fi
WHEELS=${WHEELS:-.device_wheels}
SITE_GIVEN=${SITE:+1}
SITE=${SITE:-$(mktemp -d /tmp/tadisr-site.XXXXXX)}
BUDGET_S=${BUDGET_S:-450}
PARTS=${PARTS-gpu_full train_step lowvram}
EXTRAS=${EXTRAS-keep_lora fp16}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # dense bf16 datasheet rate of the H100 / H200 SXM; dropped for other GPUs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
mkdir -p "$OUT"
exec 3>&1 4>&2 > >(tee -a "$OUT/device_bench.log") 2>&1
TEE_PID=$!
START=$SECONDS
RUN_JSON="$OUT/run.json"

# Update run.json: `record KEY JSON-VALUE` sets run.json[KEY] (parts.NAME for a part's row).
record() {
  "$PY" - "$RUN_JSON" "$1" "$2" <<'PY'
import json, os, sys
path, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run = json.load(open(path)) if os.path.exists(path) else {}
node = run
*parents, leaf = key.split(".")
for name in parents:
    node = node.setdefault(name, {})
node[leaf] = value
open(path + ".tmp", "w").write(json.dumps(run, indent=2) + "\n")
os.replace(path + ".tmp", path)
PY
}

setup() {
  echo "== setup: $PY, OUT=$OUT, wheels from $WHEELS into $SITE, budget ${BUDGET_S}s, dry=$DRY"
  local wheels=("$WHEELS"/*.whl) cross=()
  if [ ! -e "${wheels[0]}" ]; then
    echo "setup: no wheels in $WHEELS (make device-wheels here, then carry=[\"$WHEELS\"])"
    record setup '{"rc": 1, "error": "no wheels"}'
    return 1
  fi
  if [ "$DRY" = 1 ]; then  # install what the device gets, for its Python and platform, without loading it here
    cross=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  fi
  local t0=$SECONDS rc=0
  timeout 180 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" ${cross[@]+"${cross[@]}"} "${wheels[@]}" || rc=$?
  if [ "$DRY" != 1 ]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  # the environment as the benchmarks will see it: GPU, versions, pyproject's requirements, the imports
  timeout 120 "$PY" - "$RUN_JSON" "$SITE" "$DRY" "$rc" "$((SECONDS - t0))" "${wheels[@]##*/}" <<'PY'
import importlib, importlib.metadata as md, json, os, platform, re, socket, subprocess, sys, time
path, site, dry, rc, seconds, wheels = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6:]
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None
from packaging.requirements import Requirement

NEEDED = {"diffusers", "peft", "transformers", "safetensors", "sentencepiece", "accelerate", "numpy",
          "packaging", "pillow", "tqdm", "kornia", "pyyaml"}  # what the three benchmarks import
run = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(), "dry": dry,
       "python": platform.python_version(), "executable": sys.executable,
       "setup": {"rc": rc, "seconds": seconds, "wheels": wheels,
                 "installed": sorted(n for n in os.listdir(site) if n.endswith(".dist-info"))}}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
    smi = None
run["nvidia_smi"] = smi
reqs = []
if tomllib is not None:
    project = tomllib.load(open("pyproject.toml", "rb"))["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["train"]
run["requirements"], problems = {}, []
for text in reqs:
    req = Requirement(text)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    ok = have is not None and req.specifier.contains(have, prereleases=True)
    needed = re.sub(r"[-_.]+", "-", req.name).lower() in NEEDED
    run["requirements"][req.name] = {"want": str(req.specifier), "have": have, "ok": ok, "needed_here": needed}
    if needed and not ok:
        problems.append(f"{req.name} {req.specifier}: have {have}")
run["requirement_problems"] = problems
run["imports"] = {}
for name in ("torch", "diffusers", "peft", "transformers", "kornia", "tadisr_core.model", "training.builders"):
    try:
        module = importlib.import_module(name)
        run["imports"][name] = {"version": getattr(module, "__version__", None),
                                "from": os.path.dirname(module.__file__ or "")}
    except Exception as exc:  # reported; the parts still run and say more
        run["imports"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
import torch

run["torch"], run["cuda"] = torch.__version__, torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    run["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1), "sm_count": p.multi_processor_count,
                  "capability": f"{p.major}.{p.minor}"}
else:
    run["gpu"] = None
json.dump(run, open(path, "w"), indent=2)
print(json.dumps({k: run[k] for k in ("python", "torch", "cuda", "gpu", "requirement_problems")}))
print(json.dumps(run["imports"]))
PY
  echo "== setup done in $((SECONDS - t0))s (pip rc=$rc)"
  return "$rc"
}

# The command of each part: sets CAP, DEVICE_ARGS (the GPU run) and SMOKE_ARGS (the dry run's CPU settings).
part() {
  local name=$1 file=$1.json
  case $name in
    gpu_full)
      CAP=210
      DEVICE_ARGS=(benchmarks/bench_gpu_full.py --tiles 768 512 1024 --repeats 6 --warmup 2 --job --job-repeats 2 $PEAK)
      SMOKE_ARGS=(benchmarks/bench_gpu_full.py --smoke --tiles 64 32 --repeats 2 --warmup 1 --job --input 32
                  --job-repeats 1) ;;
    train_step)
      CAP=150
      DEVICE_ARGS=(benchmarks/bench_train_step.py --steps 8 --warmup 2)
      SMOKE_ARGS=(benchmarks/bench_train_step.py --tiny --steps 2 --warmup 1) ;;
    lowvram)
      CAP=150
      DEVICE_ARGS=(benchmarks/bench_gpu_lowvram.py --tiles 512 768 1024)
      SMOKE_ARGS=(benchmarks/bench_gpu_lowvram.py --tiny --device cpu) ;;
    keep_lora|fp16)
      CAP=90
      local extra=(--keep-lora)
      file=gpu_full_keep_lora.json
      [ "$name" = fp16 ] && extra=(--dtype fp16) file=gpu_full_fp16.json
      DEVICE_ARGS=(benchmarks/bench_gpu_full.py --tiles 768 --repeats 6 --warmup 2 $PEAK "${extra[@]}")
      SMOKE_ARGS=(benchmarks/bench_gpu_full.py --smoke --repeats 1 --warmup 1 "${extra[@]}") ;;
    *)
      return 1 ;;
  esac
  DEVICE_ARGS+=(--out "$OUT/$file")
  SMOKE_ARGS+=(--out "$OUT/$file")
}

# run_part NAME MIN_LEFT: runs the part under timeout min(CAP, budget left) if at least MIN_LEFT seconds are
# left (extras ask for their whole cap), records its exit status and seconds in run.json, never fails.
run_part() {
  local name=$1 min_left=$2 left rc t0
  left=$((BUDGET_S - (SECONDS - START)))
  if ! part "$name"; then
    echo "== $name: no such part (parts: gpu_full train_step lowvram keep_lora fp16)"
    record "parts.$name" '{"rc": 127, "error": "no such part"}'
    FAILED=$((FAILED + 1))
    return 0
  fi
  [ "$min_left" = cap ] && min_left=$CAP
  if [ "$left" -lt "$min_left" ]; then
    echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left (needs ${min_left}s)"
    record "parts.$name" "{\"skipped\": true, \"budget_left_s\": $left}"
    return 0
  fi
  local args_ok=null
  if [ "$DRY" = 1 ]; then  # the GPU run's arguments must parse: without CUDA each benchmark stops right after
    local said
    said=$(CUDA_VISIBLE_DEVICES= timeout 120 "$PY" "${DEVICE_ARGS[@]}" 2>&1 >/dev/null)
    if grep -q "no CUDA device" <<<"$said"; then
      args_ok=true
    else
      args_ok=false
      FAILED=$((FAILED + 1))
      echo "== $name: the device arguments did not parse: ${DEVICE_ARGS[*]}"$'\n'"$said"
    fi
    ARGS=("${SMOKE_ARGS[@]}")
  else
    ARGS=("${DEVICE_ARGS[@]}")
  fi
  left=$((BUDGET_S - (SECONDS - START)))
  local limit=$((CAP < left ? CAP : left))
  [ "$limit" -lt 1 ] && limit=1  # `timeout 0` would mean no limit at all
  echo "== $name (limit ${limit}s, $((SECONDS - START))s into the run): $PY ${ARGS[*]}"
  t0=$SECONDS
  timeout -k 10 "$limit" "$PY" "${ARGS[@]}"
  rc=$?
  local timed_out=false
  [ "$rc" != 0 ] && FAILED=$((FAILED + 1))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # 137: it outlived the 10 s after the TERM
    timed_out=true
    echo "== $name: stopped at its ${limit}s limit (what it measured so far is in its JSON)"
  fi
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  record "parts.$name" "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit,
    \"timed_out\": $timed_out, \"device_args_parse\": $args_ok}"
}

FAILED=0
setup || { echo "== setup failed: the parts run anyway and report what is missing"; FAILED=1; }
PEAK=""  # the datasheet rate only for the GPUs it is for (the dry run checks that the argument parses)
if [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -Eq 'H100|H200'; then
  PEAK="--peak-tflops $PEAK_TFLOPS"
fi
for name in $PARTS; do run_part "$name" 20; done
for name in $EXTRAS; do run_part "$name" cap; done
rm -f "$OUT"/*.tmp
[ "$DRY" = 1 ] && [ -z "$SITE_GIVEN" ] && rm -rf "$SITE"  # the rehearsal's own temporary install
record total_s "$((SECONDS - START))"
echo "== done in $((SECONDS - START))s; files in $OUT:"
ls -l "$OUT"
# the figures to read first (all of them are in the JSON files)
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
run = load("run.json") or {}
print("parts:", json.dumps(run.get("parts")))
for name in ("gpu_full.json", "gpu_full_keep_lora.json", "gpu_full_fp16.json"):
    r = load(name)
    if not r:
        continue
    print(f"{name}: {r.get('device')} {r.get('dtype')} lora {r.get('lora')} complete={r.get('complete')} "
          f"matmul {r.get('matmul_tflops_measured')} TFLOP/s")
    for tile, t in (r.get("tiles") or {}).items():
        for stage, row in (t.get("stages") or {"tile": t}).items():
            print(f"  tile {tile} {stage}: " + ("ERROR " + row["error"] if "error" in row else
                  f"{row['median_s']} s (spread {row['spread']}), {row.get('achieved_tflops')} TFLOP/s, "
                  f"peak {row['peak_activation_gib']} GiB, finite {row['finite']}"))
    for mode, row in (r.get("job") or {}).items():
        if isinstance(row, dict):
            print(f"  job {mode}: " + row.get("error", f"{row.get('median_s')} s, peak {row.get('peak_vram_gib')} GiB"))
r = load("train_step.json")
if r:
    print("train_step:", {k: r.get(k) for k in ("device", "s_per_step", "s_per_step_spread", "peak_mem_gib", "error")})
r = load("lowvram.json")
if r:
    print(f"lowvram: {r.get('gpu', r.get('device'))} complete={r.get('complete')}")
    for row in r.get("rows", []):
        print("  ", json.dumps(row))
PY
exec 1>&3 2>&4 3>&- 4>&-  # close the pipe to tee and let it write the log's end before the command returns
wait "$TEE_PID" 2>/dev/null || sleep 1
exit $((FAILED > 0))  # 0 when setup and every part that ran exited 0
