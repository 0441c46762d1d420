#!/usr/bin/env bash
# The GPU run of the smoke on a lent GPU machine (no network there): that machine's own torch, with
# transformers 4.49.0, deepspeed and their missing dependencies carried as wheels in WHEELS (see README,
# "GPU check"). Runs the good stack, then the seed's DeepSpeed 0.15.4 to see where it really breaks.
set -u
WHEELS=${1:-.whl}
OUT=${OUT:-/tmp/vlmbuild-gpu}
mkdir -p "$OUT" /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site15 "$WHEELS"/ds15/*.whl || exit 2
ln -sfn "$PWD/builder" /tmp/pkg/vlmbuild   # the source tree's import name
nvidia-smi -L
export PYTHONPATH=/tmp/pkg:/tmp/site
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
start=$(date +%s)
timeout 300 python3 -m vlmbuild smoke --local --device gpu --report "$OUT/gpu-report.json" --timeout 240 2>&1 | tee "$OUT/gpu-smoke.log" | grep -v "^\[20"
echo "good stack: $(( $(date +%s) - start )) s"
start=$(date +%s)
PYTHONPATH=/tmp/pkg:/tmp/site15:/tmp/site timeout 200 python3 -m vlmbuild smoke --local --device gpu --report "$OUT/gpu-seed-report.json" --timeout 150 2>&1 | tee "$OUT/gpu-seed.log" | grep -v "^\[20" | grep -v "source:"
echo "seed deepspeed 0.15.4: $(( $(date +%s) - start )) s"
