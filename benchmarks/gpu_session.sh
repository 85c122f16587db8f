#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md on a lent GPU machine.
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
# then, with `.whl` carried, run `bash benchmarks/gpu_session.sh throughput`
# there with a timeout of ~560 s (~9 of a session's 15 device minutes; on a
# cold machine it takes ~8.5), and right after it, while the machine is
# still warm and its compilation cache full, `bash benchmarks/gpu_session.sh
# profile` (~1-2 minutes). `all` runs both in one call, which fits only a
# warm cache. Each benchmark has its own time limit, so an overrun still
# returns the lines printed so far. Output: $OUT (or /tmp/gpu_session) holds
# gpu.txt, one .jsonl per benchmark (the same lines go to stdout),
# stderr.log and f0/ (Perfetto traces and optimized HLO of F0's full step
# and of the augmentation; the step's trace may be too large to fetch).
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

what="${1:-all}"  # throughput, profile or all
case "${what}" in throughput | profile | all) ;;
  *) echo "usage: $0 [throughput|profile|all]" >&2; exit 2 ;;
esac

# On a cold H100 each of our measurements takes ~90 s in its own process
# (JAX start, model init, 50-60 s of compiling with XLA's autotuning of
# every convolution), so the steps below are ordered by what they settle
# and each has its own time limit.
if [[ "${what}" != profile ]]; then
  # The thesis pair first: NF-ResNet-50 vs BN-ResNet-50, 224 px, batch 256.
  timeout 240 "${python}" benchmarks/train_throughput.py --modes= --no_timm \
    --thesis 2>>"${log}" | tee "${out}/thesis.jsonl"; check thesis
  # NFNet-F0 minimal and full at 192 px, batch 256, bf16; timm's
  # dm_nfnet_f0 beside them.
  timeout 290 "${python}" benchmarks/train_throughput.py \
    2>>"${log}" | tee "${out}/train_throughput.jsonl"; check throughput
fi

if [[ "${what}" != throughput ]]; then
  # Where F0's full step and the on-device augmentation before it spend
  # their time, per HLO instruction and kind (traces and HLO in $OUT/f0 for
  # ui.perfetto.dev); reuses the executables compiled above when the
  # machine is the same (~1 minute, ~2 when cold).
  timeout 150 "${python}" benchmarks/profile_step.py --mode=full --top=40 \
    --out_dir="${out}/f0" 2>>"${log}" | tee "${out}/profile.jsonl"
  check profile_f0
fi

echo '--- summary'
grep -h -E '"(comparison|kind": "summary)' "${out}"/*.jsonl
cat "${out}"/thesis.jsonl "${out}"/train_throughput.jsonl 2>/dev/null |
  grep -h -o -E '"impl": "[^"]*", "mode": "[a-z]*", "model": "[a-z0-9_]*"|"images_per_s": [0-9.]*|"peak_memory_gib": [0-9.a-z]*|"error": "[^"]*"' |
  paste -sd' ' | sed 's/"impl"/\n"impl"/g'
tail -5 "${log}"
