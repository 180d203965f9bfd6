#!/usr/bin/env bash
# A learnability screen (benchmarks/shapesworld_learnability.md): a ShapesWorld world, the quick demo's
# clean CLIP (and ΔCLIP) on it, and their clean zero-shot accuracy on the world's five tasks.
#
#   benchmarks/shapesworld_screen.sh OUT SEED WORLD [MODEL] [CLEAN] [RECIPES] [DELTA]
#
# OUT      a new folder; results in OUT/result.txt
# SEED     world and training seed
# WORLD    ShapesWorldSpec overrides as a Python dict literal ('{}': the default world), or path:DIR
#          (an existing world)
# MODEL    overrides of the dvd-tiny-vit open_clip config, e.g. '{"vision_cfg": {...}}' (default '{}')
# CLEAN    extra `dvd train clip` keys for the clean CLIP (default '{}'); DELTA the same for ΔCLIP
# RECIPES  which of the demo's CLIPs to train, e.g. "clean-clip delta-clip" (default clean-clip)
# Environment: PYTHON (default python), SCREEN_WORLD_SIZE (default 20000, the quick preset's).
set -euo pipefail
OUT=$1; SEED=$2; WORLD=$3; MODEL=${4:-"{}"}; CLEAN=${5:-"{}"}; RECIPES=${6:-clean-clip}; DELTA=${7:-"{}"}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
"$PY" - "$OUT" "$SEED" "$WORLD" "$MODEL" "$CLEAN" "$DELTA" "${SCREEN_WORLD_SIZE:-20000}" <<'PY'
import ast, dataclasses, json, sys
from pathlib import Path

import yaml

from dvd.data.shapesworld import generate
from dvd.data.shapesworld_spec import spec_from_mapping
from dvd.demo import Demo
from dvd.demo_preset import load_preset
from dvd.models.clip import MODEL_CONFIG_DIR

out, seed, world, model, clean, delta, size = sys.argv[1:]
out, seed = Path(out), int(seed)
if world.startswith("path:"):
    root = Path(world[5:])
else:
    root = out / "world"
    generate(root, seed=seed, size=int(size), image_size=32, eval_size=200, instruct_size=200,
             shard_size=5000, spec=spec_from_mapping(ast.literal_eval(world), "the screen's WORLD"))
cfg = json.loads((Path(MODEL_CONFIG_DIR) / "dvd-tiny-vit.json").read_text())
for key, value in ast.literal_eval(model).items():
    cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
(out / "model.json").write_text(json.dumps(cfg, indent=2))
demo = Demo(out, dataclasses.replace(load_preset("quick"), seed=seed))
for name, extra in (("clean-clip", clean), ("delta-clip", delta)):
    train = {**demo.clip_config(name), "data": str(root), "model": str(out / "model.json")}
    (out / f"{name}.yaml").write_text(yaml.safe_dump({**train, **ast.literal_eval(extra)}))
(out / "world_path").write_text(str(root))
PY
ROOT=$(cat "$OUT/world_path")
for R in $RECIPES; do
  START=$(date +%s)
  dvd train clip --config "$OUT/$R.yaml" > "$OUT/train_$R.log" 2>&1
  echo "$R train $(( $(date +%s) - START )) s" >> "$OUT/times.txt"
  dvd eval zeroshot --model "$OUT/models/$R/final" --attack none --eps 0 --batch-size 200 --no-progress \
    --dataset "$ROOT/zeroshot/color" --dataset "$ROOT/zeroshot/shape" --dataset "$ROOT/zeroshot/count" \
    --dataset "$ROOT/zeroshot/size" --dataset "$ROOT/zeroshot/texture" --out "$OUT/zs_$R.json" \
    > "$OUT/eval_$R.log" 2>&1
  "$PY" -c 'import json, sys
rows = json.load(open(sys.argv[1]))
accuracy = {r["dataset"].split("/")[-1]: 100 * r["clean"] for r in rows}
print(sys.argv[2], " ".join(f"{task}={value:.1f}" for task, value in accuracy.items()))' \
    "$OUT/zs_$R.json" "$R" | tee -a "$OUT/result.txt"
done
