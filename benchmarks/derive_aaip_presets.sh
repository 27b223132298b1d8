#!/usr/bin/env bash
# Derive the shipped aaip-* presets (effkern/schedules/aaip/*.json) with `effkern schedule search`
# on Fashion-MNIST at the reproduction study's CPU setting (benchmarks/reproduce.py --quick).
# Procedure: a baseline reference run of 1 epoch-equivalent, checkpointed at 0/25/50/75/100 % of its
# budget; at each checkpoint the CA-MSE of patch {4, 8} x keep {1, .75, .5, .25} (one keep for all
# branches) from 3 minibatches x 2 draws; n = 1 (variance of one baseline step at equal compute);
# the monotone-decompression rule of docs/schedules_search.md.  ~2-5 min per method on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFKERN=${EFFKERN:-.venv/bin/effkern}
for m in ${METHODS:-mocov3 simclr dino}; do
  case $m in
    mocov3) MA=(--method-arg mlp_dim=256 --method-arg out_dim=64) ;;
    simclr) MA=(--method-arg hidden_dim=256 --method-arg out_dim=64) ;;
    dino) MA=(--method-arg out_dim=1024 --method-arg hidden_dim=256 --method-arg bottleneck_dim=64 --method-arg n_local=4) ;;
  esac
  "$EFFKERN" schedule search --method "$m" --data fashion-mnist --base-size 32 --limit-train 4000 --limit-test 1000 \
    --batch-size 128 --lr 1.5e-3 --epochs-equivalent 1 --model-arg depth=2 --model-arg patch_size=4 \
    --model-arg embed_dim=96 --model-arg num_heads=3 "${MA[@]}" --checkpoints 0,0.25,0.5,0.75,1 \
    --patch-sizes 4 8 --keeps 1 0.75 0.5 0.25 --n-batches 3 --repeats 2 --n 1 --out "runs/search/$m"
  cp "runs/search/$m/schedule.json" "effkern/schedules/aaip/aaip-$m.json"
done
