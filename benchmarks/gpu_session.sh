#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call on a lent GPU machine.
#
# The GPU image has JAX, optax, orbax, timm and torch but not dm-haiku, jmp,
# ml-collections or tensorboardX. Once, here, fetch them as wheels into the
# ignored folder .whl (pure Python, ~0.6 MB):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp -d .whl \
#     dm-haiku==0.0.17 jmp==0.0.4 ml-collections==1.1.0 tensorboardX==2.6.5
#
# then run `bash benchmarks/gpu_session.sh` there with `.whl` carried and a
# timeout of ~580 s. Each benchmark has its own time limit, so an overrun
# still returns the lines printed so far. Output: $OUT (or /tmp/gpu_session)
# holds gpu.txt and one .jsonl per benchmark; the same lines go to stdout.
# On a CPU (PYTHON=.venv/bin/python) the benchmarks pick tiny defaults.
set -uo pipefail
out="${OUT:-/tmp/gpu_session}"
mkdir -p "${out}"
cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python3}"  # PYTHON=.venv/bin/python to try it on a CPU
if [[ -d .whl ]]; then
  "${python}" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:${PYTHONPATH}}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv \
    2>/dev/null || echo 'no nvidia-smi'
  "${python}" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} | tee "${out}/gpu.txt"

# The device half of the input pipeline (no TensorFlow needed): RandAugment
# 4/5 + MixUp/CutMix + normalisation of a 256-image batch at 192 px.
timeout 120 "${python}" benchmarks/input_pipeline.py --device_augment_only \
  --batch_size=256 --devices=1 --num_batches=20 \
  | tee "${out}/device_augment.jsonl"

# NFNet-F0 minimal and full at 192 px, batch 256, bf16; timm's dm_nfnet_f0
# side by side; NF-ResNet-50 vs BN-ResNet-50 at 224 px.
timeout 420 "${python}" benchmarks/train_throughput.py --thesis \
  | tee "${out}/train_throughput.jsonl"
