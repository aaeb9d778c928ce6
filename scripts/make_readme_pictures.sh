#!/usr/bin/env bash
# Train four small models on the demo digits shipped with npvae and draw the README's pictures
# into docs/. Offline, about two minutes on two cores.  Usage: bash scripts/make_readme_pictures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=$(mktemp -d)
out=docs
mkdir -p "$out"
common=(--dataset demo --epochs 50 --patience 0 --no-progress --no-pictures --log-grad-norms)
npvae train --model vae "${common[@]}" --out "$runs/vae"
npvae train --model vae "${common[@]}" --latent-dim 2 --out "$runs/vae2"
npvae train --model cvae "${common[@]}" --out "$runs/cvae"
npvae train --model dae "${common[@]}" --out "$runs/dae"
for what in reconstructions samples interpolation latent curves kl grad-norms; do
  npvae plot "$runs/vae/best.npz" "$what" --out "$out/$what.png"
done
npvae plot "$runs/vae2/best.npz" manifold --out "$out/manifold.png"
npvae plot "$runs/vae2/best.npz" latent --out "$out/latent2d.png"
npvae plot "$runs/cvae/best.npz" samples --label 7 --n 32 --out "$out/cvae_sevens.png"
npvae plot "$runs/cvae/best.npz" classes --out "$out/cvae_classes.png"
npvae plot "$runs/dae/best.npz" reconstructions --out "$out/dae_reconstructions.png"
mkdir -p "$out/grads"
npvae grads "$runs/vae/best.npz" --out "$out/grads" --k 1,5,50 --snr-draws 100 > "$out/grads/tables.txt"
npvae evaluate "$runs/vae/best.npz" --iw-samples 1000 --n 500 > "$out/evaluate.txt"
npvae evaluate "$runs/cvae/best.npz" > "$out/evaluate_cvae.txt"
echo "pictures in $out/, runs in $runs/"
