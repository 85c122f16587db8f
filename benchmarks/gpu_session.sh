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
# timeout of ~560 s (about 9 of a session's 15 device minutes). Each
# benchmark has its own time limit, so an overrun still returns the lines
# printed so far. Output: $OUT (or /tmp/gpu_session)
# holds gpu.txt, one .jsonl per benchmark (the same lines go to stdout),
# stderr.log and f0/ (F0's Perfetto trace and optimized HLO).
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

# A compilation cache shared by the processes below: the profiles reuse the
# executables the throughput run compiled (and autotuned) first.
export JAX_COMPILATION_CACHE_DIR=/tmp/nfnets_jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
log="${out}/stderr.log"
# Records a step that failed or ran out of time (timeout exits 124).
check() { local rc=$?; ((rc)) && echo "step '$1' exited ${rc}" | tee -a "${log}"; }

# NFNet-F0 minimal and full at 192 px, batch 256, bf16; timm's dm_nfnet_f0
# side by side; NF-ResNet-50 vs BN-ResNet-50 at 224 px. Each measurement in
# its own process (peak memory per measurement). On an H100 each of ours
# compiles in 40-60 s (XLA autotunes every convolution), so the five take
# ~5-6 minutes.
timeout 400 "${python}" benchmarks/train_throughput.py --thesis \
  2>>"${log}" | tee "${out}/train_throughput.jsonl"; check throughput

# Where F0's step time goes, per HLO instruction and kind (trace and HLO
# kept in $OUT/f0 for ui.perfetto.dev); reuses the compiled step above.
timeout 60 "${python}" benchmarks/profile_step.py --out_dir="${out}/f0" \
  2>>"${log}" | tee "${out}/profile.jsonl"; check profile_f0

# The device half of the input pipeline (no TensorFlow needed): RandAugment
# 4/5 + MixUp/CutMix + normalisation of a 256-image batch at 192 px.
timeout 40 "${python}" benchmarks/input_pipeline.py --device_augment_only \
  --batch_size=256 --devices=1 --num_batches=20 \
  2>>"${log}" | tee "${out}/device_augment.jsonl"; check device_augment

echo '--- summary'
grep -h -E '"(comparison|kind": "summary)' "${out}"/*.jsonl
grep -h -o -E '"impl": "[^"]*", "mode": "[a-z]*", "model": "[a-z0-9_]*"|"images_per_s": [0-9.]*|"peak_memory_gib": [0-9.a-z]*|"error": "[^"]*"' \
  "${out}/train_throughput.jsonl" | paste -sd' ' | sed 's/"impl"/\n"impl"/g'
tail -5 "${log}"
