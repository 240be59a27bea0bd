#!/usr/bin/env bash
# The main job on its embedded default: a short DDPM training run on Fashion-MNIST with the
# best backend this machine has, then a grid of samples from the trained model.
#
#   scripts/run.sh                 # 3-5 minutes on 2 CPU cores; seconds on a GPU
#   STEPS=20000 scripts/run.sh     # a real run (resume it later with `ddpm train --resume`)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

STEPS="${STEPS:-200}"
RUN="${RUN:-runs/quickstart}"

# The same build as the test suite (dependencies optimised), so it is reused when present.
cargo build --workspace --locked
DDPM=target/debug/ddpm

if [ -f "$RUN/config.json" ]; then
  "$DDPM" train --resume "$RUN" --steps "$STEPS"
else
  "$DDPM" train --data fashion-mnist --model tiny --batch-size 32 --steps "$STEPS" \
    --warmup 50 --lr 1e-3 --checkpoint-every 50 --sample-every 100 --out "$RUN"
fi
"$DDPM" sample --model "$RUN/model.safetensors" --n 16 --sampler ddim --steps 50 --seed 0 \
  --out "$RUN/samples.png"
echo "samples: $RUN/samples.png  loss curve: $RUN/loss.png  model: $RUN/model.safetensors"
