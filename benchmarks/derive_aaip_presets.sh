#!/usr/bin/env bash
# Derive the aaip-* presets (effkern/schedules/aaip/*.json) with `effkern schedule search` on the
# small-scale study's setting (benchmarks/study.py): Fashion-MNIST, all 60k training images at 28 px,
# the small-image model preset (patch 4, 4 blocks, width 128), the study's heads, and the study's
# anchor budget (EPOCHS=3.2 epochs-equivalent = 192k images) with the method's own tuned batch size and LR
# there (per 256 images, sqrt rule; read from `benchmarks/study.py tuned`, so its tuning grid at 192k must
# have finished; BATCH=.. LR=.. override): the reference run is then the study's own `none` seed-0
# baseline trajectory (the study runs the re-derived schedule's cells only when the recorded
# reference_config.json matches that winner).  The schedule's progress fractions refer to that run.  Procedure: a baseline reference
# run of EPOCHS epochs-equivalent, checkpointed at
# 0/25/50/75/100 % of its budget; at each checkpoint the CA-MSE of patch {4, 7} (the sizes that tile 28 px: 49 and 16 tokens) x keep {1, .75, .5, .25}
# (one keep for all branches) from N_BATCHES minibatches x REPEATS draws; CA-MSE = bias^2 + cost * Var / n
# for each n in NS, all from one estimation (the choice flips with n at small sample sizes: report every n);
# the monotone-decompression rule of docs/schedules_search.md.  By default (COPY=0) the package's
# presets are left alone (the study measures them and the re-derived schedules side by side);
# COPY=1 copies the schedule of COPY_N into effkern/schedules/aaip/.  Roughly 25-40 min per method on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFKERN=${EFFKERN:-.venv/bin/effkern}
N_BATCHES=${N_BATCHES:-8}
REPEATS=${REPEATS:-4}
NS=${NS:-1 4 16}
COPY_N=${COPY_N:-4}
COPY=${COPY:-0}
EPOCHS=${EPOCHS:-3.2}
PYTHON=${PYTHON:-.venv/bin/python}
for m in ${METHODS:-mocov3 simclr dino}; do
  # the study's own heads (benchmarks/study.py METHOD_KWARGS; for DINO also its 2 global crops and BN head)
  read -ra KV <<< "$("$PYTHON" benchmarks/study.py method-args --method "$m")"
  MA=(); for kv in "${KV[@]}"; do MA+=(--method-arg "$kv"); done
  if [ -n "${BATCH:-}" ] && [ -n "${LR:-}" ]; then hp="$BATCH $LR"
  else hp=$("$PYTHON" benchmarks/study.py tuned --method "$m") || { echo "derive_aaip_presets.sh: run $m's 192k tuning grid first, or pass BATCH=.. LR=.." >&2; exit 2; }
  fi
  batch=${hp% *}; lr=${hp#* }
  out="runs/search/$m"
  # one reference run and one gradient estimation for every n (each n's files in $out/n<n>/, or in $out for a
  # single n); a rerun after a kill reuses the reference checkpoints of the same run (`schedule search` checks
  # every setting; a run at other settings is retrained from step 0 and starts a fresh metrics log)
  read -ra NV <<< "$NS"
  "$EFFKERN" schedule search --method "$m" --data fashion-mnist --base-size 28 --batch-size "$batch" \
    --lr "$lr" --epochs-equivalent "$EPOCHS" "${MA[@]}" --checkpoints 0,0.25,0.5,0.75,1 --patch-sizes 4 7 --keeps 1 0.75 0.5 0.25 \
    --n-batches "$N_BATCHES" --repeats "$REPEATS" --n "${NV[@]}" --no-progress --out "$out" --name "aaip-$m"
  for n in "${NV[@]}"; do
    n=$(printf '%g' "$n")  # the directory name `schedule search` gives that n
    src="$out/n$n"; [ "${#NV[@]}" -gt 1 ] || { mkdir -p "$src" && cp "$out"/search.* "$out"/heatmap_*.png "$out/schedule.json" "$src/"; }
    # committed beside the study (benchmarks/study.py summarize reports them in docs/results.md)
    keep="benchmarks/results/aaip_search/$m/n$n"
    mkdir -p "$keep" && cp "$src"/search.json "$src"/search.md "$src/schedule.json" "$keep/"
    if [ "$n" = "$(printf '%g' "${NV[0]}")" ]; then cp "$src"/heatmap_*.png "$keep/"; fi  # heatmaps of the first n only
  done
  # the reference run's trainer config (batch size, LR, budget, heads): the report says which settings the
  # search used, and the study checks them before it runs the schedule
  cp "$out/reference/config.json" "benchmarks/results/aaip_search/$m/reference_config.json"
  if [ "$COPY" = 1 ]; then cp "runs/search/$m/n$COPY_N/schedule.json" "effkern/schedules/aaip/aaip-$m.json"; fi
done
