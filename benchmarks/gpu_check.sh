#!/usr/bin/env bash
# ./dev gpu -- validate effkern on a lent GPU in at most EFFKERN_GPU_BUDGET_S seconds
# (default 480 = 8 min, counted from the start of this script), printing progress.
#
# Steps, each under its own time limit (the smaller of its share and what is left),
# most valuable first so that a run cut short keeps what matters:
#   build      effkern._C with the CUDA kernels for this GPU's arch: `./dev setup` where
#              .venv exists, else an offline in-place build against the interpreter's own
#              torch (a lent machine has no registry; a failed CUDA build falls back to
#              the C++ CPU kernels so that the Triton steps still run)
#   tests      every GPU test: pytest -k "cuda or gpu" (all ops vs the float64 oracles
#              in fp32/bf16/fp16, opcheck of every op on CUDA, the flash backend, the timm
#              drop-in), in parallel when pytest-xdist is there; the compile-only checks
#              (tests/test_gpu_compile.py, nvcc SASS check) are left to CI
#   bench-*    effkern bench attention (peers: padded SDPA, FA2 varlen) / vit against timm
#   train      a short `effkern train --device cuda --compile` (bf16 autocast on CUDA)
#   bench-*    effkern bench patch_embed / fft_crop
#   autotune   python -m effkern.tools.autotune (the Triton kernels at ViT shapes)
#   bench-attention-flex   FlexAttention as the peer (one workload: it compiles per shape)
# Results: benchmarks/results/<bench>_<gpu>.{json,md} (e.g. attention_h200.md), the
# autotune winners autotune_<gpu>.{json,md}, and gpu_run_<gpu>.{json,md} with every
# step's exit status and seconds and the versions, rewritten after each step: a run cut
# short keeps what finished (the benchmarks rewrite theirs after each workload).
# Shares fitted to the first H200 run (2026-12-04): build 45 s, tests 105 s, autotune
# 23 s, bench vit for one model < 95 s on a fresh machine.  Logs: build/gpu/<step>.log.  With EFFKERN_GPU_OUT=DIR, DIR
# also gets gpu_results.tar.gz (results + logs) after each step.
#
# Interpreter: PY, else .venv/bin/python, else python3 (a lent machine's own torch).
# Without a visible CUDA GPU it says so, runs the part that needs none (the Triton
# compile check for sm_90/sm_80) and exits 3.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3 || echo python3); fi
fi
BUDGET="${EFFKERN_GPU_BUDGET_S:-480}"
START=$SECONDS
RESULTS=benchmarks/results
mkdir -p "$RESULTS" build/gpu

say() { printf '\n== [%4ds / %ds] %s\n' $((SECONDS - START)) "$BUDGET" "$*"; }

if [[ ! -x "$PY" ]] || ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA GPU visible (torch.cuda.is_available() is False or no $PY): the GPU steps need one"
  if [[ -x "$PY" ]]; then
    say "running what needs no GPU: the Triton compile check (sm_90, sm_80; effkern doctor --compile-gpu)"
    "$PY" -m effkern.tools.gpu_compile --scope ci --quiet
    echo "compile check exit status: $?"
  fi
  echo "./dev gpu: GPU steps not run (no GPU)"
  exit 3
fi

TAG="$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(); m = re.search(r'(GH200|H200|H100|B200|A100|L40S|L4|A10G)', n); print((m.group(1) if m else 'cuda').lower())")"
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
STEPS=()

record() {  # rewrite gpu_run_<tag>.{json,md} from STEPS ("name|rc|seconds")
  "$PY" - "$RESULTS/gpu_run_$TAG" "$BUDGET" "${STEPS[@]}" <<'EOF'
import json, os, subprocess, sys, time
import torch
prefix, budget, steps = sys.argv[1], sys.argv[2], [s.split("|") for s in sys.argv[3:]]
commit = os.environ.get("EFFKERN_COMMIT") or subprocess.run(  # a copied tree may have no .git
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
def version(name):
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 -- a missing package is a fact to record, not an error
        return None
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip() or None
env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "driver": driver, "triton": version("triton"), "timm": version("timm"), "python": sys.version.split()[0],
       "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "./dev gpu",
       "budget_s": int(budget)}
rows = [{"step": n, "exit": None if rc == "" else int(rc), "seconds": int(s)} for n, rc, s in steps]
json.dump({"environment": env, "steps": rows}, open(prefix + ".json", "w"), indent=1)
with open(prefix + ".md", "w") as f:
    f.write(f"# ./dev gpu on {env['device']} ({env['date']}, commit {env['commit']})\n\n"
            f"torch {env['torch']}, CUDA {env['cuda']}, driver {env['driver']}, triton {env['triton']}, "
            f"timm {env['timm']}, Python {env['python']}; budget {budget} s\n\n"
            "| step | exit | seconds |\n|---|---:|---:|\n")
    for r in rows:
        status = "skipped (budget spent)" if r["exit"] is None else ("ok" if r["exit"] == 0 else
                 ("cut at its time limit" if r["exit"] in (124, 137) else f"FAILED ({r['exit']})"))
        f.write(f"| {r['step']} | {status} | {r['seconds']} |\n")
EOF
  if [[ -n "${EFFKERN_GPU_OUT:-}" ]]; then
    mkdir -p "$EFFKERN_GPU_OUT"
    tar czf "$EFFKERN_GPU_OUT/gpu_results.tar.gz" $RESULTS/*_"$TAG".* build/gpu/*.log build/gpu/*.xml 2>/dev/null
  fi
}

step() {  # step NAME SHARE_SECONDS CMD...
  local name=$1 share=$2 left limit began rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then
    say "skip $name: budget spent"
    STEPS+=("$name||0"); record; return
  fi
  limit=$((share < left ? share : left))
  say "$name (limit ${limit}s): $*"
  began=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "build/gpu/$name.log"
  rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - began))s"
  STEPS+=("$name|$rc|$((SECONDS - began))"); record
}

say "GPU: $TAG (sm ${ARCH/./}); results -> $RESULTS/*_$TAG.{json,md}; interpreter $PY"
nvidia-smi 2>&1 | tee build/gpu/nvidia-smi.log
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ "$PY" == .venv/bin/python ]]; then
  step build 120 ./dev setup
else  # no registry on a lent machine: build in place against the interpreter's own torch
  step build 120 bash -c "$PY setup.py -q build_ext --inplace || { echo 'CUDA build failed: C++ CPU kernels only'; EFFKERN_CUDA=0 $PY setup.py -q build_ext --inplace; }"
fi
export EFFKERN_EXPECT_CUDA_KERNELS=1  # tests/test_package.py: the CUDA kernels must be in _C
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout 90)
step tests 130 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or gpu" -rs "${PARALLEL[@]}" \
  --ignore tests/test_gpu_compile.py --deselect \
  tests/test_fft_crop_tensorcore.py::test_cuda_kernels_compile_onto_tensor_cores_without_spills \
  --junitxml build/gpu/tests.xml
# FlexAttention recompiles per workload (tens of seconds each): its own step, last
step bench-attention 75 "$PY" -m effkern bench attention --models vit-b,vit-h --keeps 1,0.5 --repeat 10 \
  --peers sdpa,varlen --out "$RESULTS/attention_$TAG"
step bench-vit 110 "$PY" -m effkern bench vit --models vit_b16 --keeps 1,0.5,0.25 --patches 32 --combos 32:0.5 \
  --repeat 5 --out "$RESULTS/vit_$TAG"
step train 60 "$PY" -m effkern train --device cuda --compile --method mocov3 --data digits --base-size 32 \
  --limit-train 2048 --limit-test 512 --batch-size 256 --budget 0.02 --schedule "const:keep=0.5" \
  --eval-every 0 --no-progress --out build/gpu/train
step bench-patch_embed 30 "$PY" -m effkern bench patch_embed --repeat 10 --out "$RESULTS/patch_embed_$TAG"
step bench-fft_crop 25 "$PY" -m effkern bench fft_crop --repeat 10 --out "$RESULTS/fft_crop_$TAG"
step autotune 35 "$PY" -m effkern.tools.autotune --out "$RESULTS/autotune_$TAG"
step bench-attention-flex 45 "$PY" -m effkern bench attention --models vit-b --keeps 0.5 --no-dino --repeat 10 \
  --peers flex --out "$RESULTS/attention_flex_$TAG"
say "done: $RESULTS/gpu_run_$TAG.md"
cat "$RESULTS/gpu_run_$TAG.md"
