#!/usr/bin/env bash
# Build a tiny SD 1.x model and a toy dataset locally, then train a LoRA on them through accelerate launch.
# Usage: bash scripts/demo.sh   (after bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
out=demo_output
python -m library.testing.tiny_models --out "$out/model" --variant sd1 > /dev/null
python -m library.testing.toy_data --out "$out/data" --count 12 > /dev/null
set -x
accelerate launch train_network.py \
  --pretrained_model_name_or_path "$out/model/sd1.safetensors" \
  --dataset_config "$out/data/dataset.toml" \
  --output_dir "$out/lora" --output_name demo_lora \
  --network_module networks.lora --network_dim 4 --network_alpha 2 \
  --learning_rate 1e-3 --max_train_steps 36 --save_every_n_epochs 2 --seed 42 \
  --tokenizer_cache_dir "$out/tokenizer"
set +x
echo "LoRA written to: $(pwd)/$out/lora/demo_lora.safetensors"
