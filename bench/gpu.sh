#!/usr/bin/env bash
# All GPU checks in one call (docs/gpu.md): bench/engine.py on CUDA (it builds the engine), the tests marked gpu,
# bench/e2e.py with the agent on the GPU, all on one engine cache.
# Figures and logs go to $OUT (the device tool's folder; ./gpu-out elsewhere).
#
# On the lent machine, from the repository root, with .whl/ made by bench/gpu_wheels.sh carried along:
#   bash bench/gpu.sh                    # the engine checks: about 8 minutes
#   bash bench/gpu.sh training           # training on the GPU: bench/train_gpu.py and the training tests marked
#                                        # gpu, about 4 minutes (the tests need the wheels too)
#   bash bench/gpu.sh engine training    # both (over the 10 minutes one device call may take)
#   bash bench/gpu.sh continue-training  # continue the run in runs/train-v2 (carried along) on the GPU for
#                                        # SCT_TRAIN_SECONDS (default 420) and bring it back in $OUT
#   bash bench/gpu.sh triton             # bench/scale_out.py: 1, 2, 4 CPU agents against one `sct-agent serve` on the
#                                        # GPU, and inferring locally (estimated 5-9 minutes, not yet run there); needs
#                                        # PyTriton from PyPI or from wheels in .whl/serve/ (carried), else skipped
# Each step has its own time limit so that a hang in one still leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
# One engine cache for every step: the engine the benchmark builds is the one the agent then loads.
CACHE=/tmp/sct-engine-cache
mkdir -p "$CACHE"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }
PARTS=" ${*:-engine} "
want() { [[ "$PARTS" == *" $1 "* ]]; }

log "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee -a "$OUT/summary.txt"

if want engine; then
log "bench/engine.py on CUDA (first start builds the engine, second start loads it)"
timeout 220 python3 bench/engine.py --configs torch-cuda/fp16 --runs 3 --threads 16 --cache-dir "$CACHE" \
  --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt" | tail -20
echo "engine exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

log "tests marked gpu (they load the engine just built; warnings are shown, not turned into errors there)"
SCT_TEST_ENGINE_CACHE="$CACHE" timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider \
  -o filterwarnings=default tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

log "bench/e2e.py, agent on the GPU (same engine cache)"
timeout 180 python3 bench/e2e.py --runs 2 --backend torch-cuda --engine-cache "$CACHE" \
  --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.txt" | tail -25
echo "e2e exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
fi

if want training; then
log "bench/train_gpu.py: subjects/min with 14 workers, steps/s of the v2 recipe's step on CUDA"
timeout 240 python3 bench/train_gpu.py --device cuda --workers 14 --steps 1000 --json "$OUT/train_gpu.json" \
  2>&1 | tee "$OUT/train_gpu.txt" | tail -8
echo "train_gpu exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

log "training tests marked gpu (a run continued from the CPU on the GPU and back)"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider -o filterwarnings=default tests/test_training.py \
  2>&1 | tee "$OUT/pytest-training-gpu.txt" | tail -15
echo "pytest training exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
fi

if want continue-training; then
RUN=${SCT_TRAIN_RUN:-runs/train-v2}
log "continue the training run in $RUN on the GPU for ${SCT_TRAIN_SECONDS:-420} s (a checkpoint every 200 steps)"
timeout "${SCT_TRAIN_SECONDS:-420}" python3 -m agent.cli train --out "$RUN" --device cuda --workers 14 --no-package \
  2>&1 | tee "$OUT/train-run.txt" | tail -5
echo "train run exit ${PIPESTATUS[0]} (124: stopped by the time limit, resumable)" | tee -a "$OUT/summary.txt"
mkdir -p "$OUT/$RUN" && cp -r "$RUN"/. "$OUT/$RUN/"
fi
if want triton; then
log "bench/scale_out.py: 1, 2, 4 agents (CPU processes) against one sct-agent serve on the GPU (--backend auto), and inferring locally"
# The server runs from its own environment made from the system's python3 (PyTriton's model stub loads the system's
# libpython); --system-site-packages keeps this machine's CUDA torch, PYTHONPATH the agent and the wheels above.
# Without PyPI, PyTriton's wheels come from .whl/serve/ (pip download nvidia-pytriton==0.7.0 'tritonclient[grpc]'
# --only-binary=:all: --python-version 3.12 -d .whl/serve, on a machine with PyPI). Any failure skips this part.
SERVE_VENV=/tmp/sct-bench-serve-env
serve_problem=""
if [ ! -x "$SERVE_VENV/bin/python" ] && ! python3 -m venv --system-site-packages "$SERVE_VENV" >"$OUT/serve-env.txt" 2>&1; then
  serve_problem="python3 -m venv failed (see serve-env.txt)"
fi
if [ -z "$serve_problem" ] && ! "$SERVE_VENV/bin/python" -c "import pytriton, tritonclient.grpc" 2>/dev/null; then
  if compgen -G ".whl/serve/*.whl" >/dev/null; then
    timeout 300 "$SERVE_VENV/bin/python" -m pip install -q --no-cache-dir --no-index --find-links .whl/serve \
      nvidia-pytriton==0.7.0 'tritonclient[grpc]>=2.50' >>"$OUT/serve-env.txt" 2>&1 \
      || serve_problem="PyTriton did not install from .whl/serve/ (see serve-env.txt)"
  else
    timeout 180 "$SERVE_VENV/bin/python" -m pip install -q --no-cache-dir --retries 1 --timeout 10 \
      nvidia-pytriton==0.7.0 'tritonclient[grpc]>=2.50' >>"$OUT/serve-env.txt" 2>&1 \
      || serve_problem="PyTriton could not be installed (no PyPI from here and no wheels in .whl/serve/; see serve-env.txt)"
  fi
fi
if [ -z "$serve_problem" ]; then
  # Empty when PyTriton can serve here; else why not (e.g. no libpython3.12.so.1.0 for its model stub).
  serve_problem=$("$SERVE_VENV/bin/python" -c "from engines.serving.triton_server import serve_environment_problem as p
print(p() or '')" 2>>"$OUT/serve-env.txt") || serve_problem="the serve environment does not import the agent (see serve-env.txt)"
fi
if [ -n "$serve_problem" ]; then
  echo "triton SKIPPED: no serve environment here: $serve_problem" | tee -a "$OUT/summary.txt"
else
  rm -rf /tmp/sct-bench-triton
  timeout 540 "$SERVE_VENV/bin/python" bench/scale_out.py --device cuda --serve-python "$SERVE_VENV/bin/python" \
    --agents 1,2,4 --runs 2 --server-cache-dir "$CACHE" --keep /tmp/sct-bench-triton --json "$OUT/triton.json" 2>&1 \
    | tee "$OUT/triton.txt" | tail -22
  echo "triton exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/triton-logs" && cp /tmp/sct-bench-triton/serve/serve.log "$OUT/triton-logs/" 2>/dev/null
fi
fi
log "done"
