#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md on a lent GPU machine.
#
# The GPU image has JAX, optax, orbax, timm and torch but not dm-haiku, jmp,
# ml-collections or tensorboardX. Before the first device call, here (not
# on the device), `bash benchmarks/gpu_session.sh prep` fetches them as
# wheels into the ignored folder .whl (pure Python, ~0.6 MB, for the GPU
# machine's Python 3.12) and writes the tree of commit ${BASE:-3a6a5cc}
# into the ignored folder .base, to compare with in the same call (3a6a5cc:
# the tree before the tenth round's max-pooling gradient and augmentation
# sub-batches, none timed on a GPU yet; BASE= leaves .base out).
#
# Then, with `.whl` (and `.base`) carried, run with a timeout of ~590 s
# (a machine idle for 30 s is given back, so a second call may start cold):
#   `bash benchmarks/gpu_session.sh round` (~10 minutes cold): F0 minimal
#     and full, the thesis pair, F0 minimal with cuDNN's conv fusions
#     (ROUND_FLAGS), the on-device augmentation alone for this tree and
#     .base, NF-ResNet-50 and BN-ResNet-50 minimal for .base;
#     on a warm machine the modes below take 40-110 s per line;
#   `bash benchmarks/gpu_session.sh ablate` (~3.5 minutes cold): F0 minimal
#     for this tree, for .base and with HWIO kernels in the state
#     (ABLATE=nf_resnet50: NF-ResNet-50's instead);
#   `bash benchmarks/gpu_session.sh flags` (~1.5 minutes per set, each
#     compiles anew): F0 minimal without and with XLA flags (FLAGS='a;b'
#     replaces the default sets; see the mode below);
#   `bash benchmarks/gpu_session.sh throughput` (~7 minutes): the thesis
#     pair, then F0 minimal (from the cache), full_step and full; TIMM=1
#     adds timm's dm_nfnet_f0 (~1.5 minutes);
#   `bash benchmarks/gpu_session.sh profile` (~2-4 minutes), if time is
#     left: F0 full, then NF-ResNet-50 (PROFILE=nfr50: that one alone).
# Without a .base folder carried, round and ablate skip its lines.
# `all` runs throughput and profile in one call, which fits only a warm
# cache. Each benchmark has its own time limit, so an overrun still returns
# the lines printed so far. Output: $OUT (or /tmp/gpu_session) holds
# gpu.txt, one .jsonl per benchmark (the same lines go to stdout),
# stderr.log and profiles.tgz: f0/ (Perfetto traces and optimized HLO of
# F0's full step and of the augmentation) and nfr50/ (the same for
# NF-ResNet-50's minimal step); `benchmarks/hlo_memory.py` replays an
# HLO's buffers.
# On a CPU (PYTHON=.venv/bin/python) the benchmarks pick tiny defaults.
set -uo pipefail
what="${1:-all}"  # prep, ablate, flags, round, throughput, profile or all
case "${what}" in prep | ablate | flags | round | throughput | profile | all) ;;
  *) echo "usage: $0 [prep|ablate|flags|round|throughput|profile|all]" >&2
    exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 1

if [[ "${what}" == prep ]]; then
  # Here, before the device call: what the call must carry (see above).
  base="${BASE-3a6a5cc}"
  if [[ -n "${base}" ]] &&
    ! git rev-parse -q --verify "${base}^{commit}" >/dev/null; then
    echo "prep: BASE=${base} is not a commit of this repository" >&2
    exit 1
  fi
  wheels=(dm-haiku==0.0.17 jmp==0.0.4 ml-collections==1.1.0
    tensorboardX==2.6.5)
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp -d .whl "${wheels[@]}" ||
    { echo "prep: could not fetch ${wheels[*]} into .whl" >&2; exit 1; }
  rm -rf .base
  if [[ -n "${base}" ]]; then
    mkdir .base && git archive "${base}" | tar -x -C .base || exit 1
  fi
  echo "carry: .whl ($(ls .whl | wc -l) wheels)${base:+ and .base (${base})}"
  exit 0
fi

out="${OUT:-/tmp/gpu_session}"
mkdir -p "${out}"
python="${PYTHON:-python3}"  # PYTHON=.venv/bin/python to try it on a CPU
# Absolute, so that the .base tree (run from its own folder) finds it too.
[[ "${python}" == */* && "${python}" != /* ]] && python="${PWD}/${python}"
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
# One measurement (the command given) for the tree in .base, when one was
# carried, appended to $OUT/${BASE_FILE:-ablate_base}.jsonl.
base_line() {
  [[ -d .base ]] || return 0
  (cd .base && "$@") 2>>"${log}" |
    tee -a "${out}/${BASE_FILE:-ablate_base}.jsonl"
  check base
}

timm_flag=--no_timm
[[ "${TIMM:-0}" == 1 ]] && timm_flag=

if [[ "${what}" == ablate ]]; then
  # A minimal step three ways, each in its own process on this machine:
  # this tree, the tree in .base, and this tree with the conv kernels kept
  # HWIO between steps (the A/B of train.to_device_layout, which keeps them
  # OHWI on GPUs; machine F: OHWI 2% faster for F0, 1% for NF-ResNet-50).
  # Donation was settled on machine E: --no_donate took 41.24 ms against
  # 40.65 ms.
  # ABLATE=nf_resnet50 does it for NF-ResNet-50 at 224 px instead of F0.
  case "${ABLATE:-nfnet_f0}" in
    nfnet_f0) model=() ;;
    nf_resnet50) model=(--model=nf_resnet50 --image_size=224) ;;
    *) echo "ABLATE must be nfnet_f0 or nf_resnet50" >&2; exit 2 ;;
  esac
  one=(timeout 120 "${python}" benchmarks/train_throughput.py --modes=minimal
    --no_timm "${model[@]}")
  "${one[@]}" 2>>"${log}" | tee "${out}/ablate_head.jsonl"; check head
  base_line "${one[@]}"
  "${one[@]}" --kernel_layout=hwio 2>>"${log}" |
    tee "${out}/ablate_hwio.jsonl"
  check hwio
fi

if [[ "${what}" == flags ]]; then
  # F0's minimal step under XLA flags that could change what this profile
  # found (every record carries its xla_flags; the first line, without
  # extra flags, is the baseline on this machine, from the cache when warm).
  # Each set is one process; an unknown flag fails that line only. FLAGS
  # replaces the list: sets separated by ';'.
  #  - conv_fusion: cuDNN fusions of the convolutions with the elementwise
  #    work around them (GELU, bias, gains), which XLA leaves to separate
  #    kernels that read and write every activation once more.
  #  - command buffer scheduling CONCURRENT: independent kernels of a CUDA
  #    graph (the optimizer's per-leaf updates) may run side by side (what
  #    the deprecated xla_gpu_graph_enable_concurrent_region turned on).
  #  - runtime_fusion: cuDNN runtime-compiled fusions of conv epilogues.
  default_sets='--xla_gpu_experimental_enable_conv_fusion=true'
  default_sets+=';--xla_gpu_command_buffer_scheduling_mode=CONCURRENT'
  default_sets+=';--xla_gpu_use_runtime_fusion=true'
  IFS=';' read -r -a sets <<<"${FLAGS:-${default_sets}}"
  base_flags="${XLA_FLAGS:-}"
  for flags in '' "${sets[@]}"; do
    (
      # XLA reads a variable that is set but blank as a file name.
      flags="$(echo "${base_flags} ${flags}" | xargs)"
      if [[ -n "${flags}" ]]; then export XLA_FLAGS="${flags}"
      else unset XLA_FLAGS; fi
      timeout 150 "${python}" benchmarks/train_throughput.py \
        --modes=minimal --no_timm
    ) 2>>"${log}" | tee -a "${out}/flags.jsonl"
    check "flags ${flags:-none}"
  done
fi

if [[ "${what}" == round ]]; then
  # Everything that settles the issue in one call, since a lent machine is
  # given back after 30 s idle and a second call may start cold: F0 minimal
  # and full for this tree, the thesis pair, F0's minimal step under
  # ROUND_FLAGS (default: cuDNN's conv fusions, the first XLA flag set of
  # `flags` below; '' skips it), F0's on-device augmentation alone (256
  # images, 192 px) for this tree and .base, then NF-ResNet-50's and
  # BN-ResNet-50's minimal steps for .base. The .base lines against this tree's
  # say what the changes since it did. ~70 s per step measurement cold
  # (machine F: 480 s for seven), ~20 s per augmentation line; the call's
  # 600 s limit may cut the tail, whose lines are then missing, not wrong.
  # (`full` compiles two steps: the one between log steps and the log step.)
  timeout 260 "${python}" benchmarks/train_throughput.py --modes=minimal,full \
    --no_timm 2>>"${log}" | tee "${out}/train_throughput.jsonl"
  check throughput
  timeout 200 "${python}" benchmarks/train_throughput.py --modes= --no_timm \
    --thesis 2>>"${log}" | tee "${out}/thesis.jsonl"; check thesis
  round_flags="${ROUND_FLAGS-"--xla_gpu_experimental_enable_conv_fusion=true"}"
  if [[ -n "${round_flags}" ]]; then
    XLA_FLAGS="$(echo "${XLA_FLAGS:-} ${round_flags}" | xargs)" \
      timeout 110 "${python}" benchmarks/train_throughput.py \
      --modes=minimal --no_timm 2>>"${log}" | tee -a "${out}/flags.jsonl"
    check "flags ${round_flags}"
  fi
  augment=(timeout 60 "${python}" benchmarks/input_pipeline.py
    --device_augment_only --devices=1 --num_batches=30)
  "${augment[@]}" 2>>"${log}" | tee "${out}/augment.jsonl"; check augment
  BASE_FILE=augment_base base_line "${augment[@]}"
  one=(timeout 110 "${python}" benchmarks/train_throughput.py --modes=minimal
    --no_timm --image_size=224)
  base_line "${one[@]}" --model=nf_resnet50
  base_line "${one[@]}" --model=resnet50_bn
fi

# On a cold H100 each of our measurements takes ~90 s in its own process
# (JAX start, model init, 50-60 s of compiling with XLA's autotuning of
# every convolution), so the steps below are ordered by what they settle
# and each has its own time limit.
if [[ "${what}" == throughput || "${what}" == all ]]; then
  # The thesis pair first: NF-ResNet-50 vs BN-ResNet-50, 224 px, batch 256.
  timeout 240 "${python}" benchmarks/train_throughput.py --modes= --no_timm \
    --thesis 2>>"${log}" | tee "${out}/thesis.jsonl"; check thesis
  # NFNet-F0 minimal, full_step and full at 192 px, batch 256, bf16 (and
  # timm's dm_nfnet_f0 beside them with TIMM=1).
  timeout 340 "${python}" benchmarks/train_throughput.py ${timm_flag} \
    2>>"${log}" | tee "${out}/train_throughput.jsonl"; check throughput
fi

if [[ "${what}" == profile || "${what}" == all ]]; then
  # PROFILE=nfr50 (or f0) profiles that model alone.
  profiles="${PROFILE:-f0 nfr50}"
  # Where F0's full step and the on-device augmentation before it spend
  # their time, per HLO instruction and kind (traces and HLO in $OUT/f0 for
  # ui.perfetto.dev); reuses the executables compiled above when the
  # machine is the same (~1 minute, ~2 when cold).
  if [[ " ${profiles} " == *" f0 "* ]]; then
    timeout 150 "${python}" benchmarks/profile_step.py --mode=full \
      --top=40 --out_dir="${out}/f0" 2>>"${log}" |
      tee "${out}/profile.jsonl"
    check profile_f0
  fi
  # NF-ResNet-50's minimal step: what stands between it and 1.2x
  # BN-ResNet-50, and (with hlo_memory.py below) where its memory peaks.
  if [[ " ${profiles} " == *" nfr50 "* ]]; then
    timeout 150 "${python}" benchmarks/profile_step.py \
      --model=nf_resnet50 --image_size=224 --top=40 \
      --out_dir="${out}/nfr50" 2>>"${log}" |
      tee "${out}/profile_nfr50.jsonl"
    check profile_nfr50
  fi
  # Where each step's memory peaks, and whether the weight gradients wait.
  for hlo in "${out}"/f0/hlo.txt.gz "${out}"/nfr50/hlo.txt.gz; do
    [[ -f "${hlo}" ]] && "${python}" benchmarks/hlo_memory.py "${hlo}" \
      --top=15 2>>"${log}" | tee -a "${out}/hlo_memory.jsonl"
  done
fi

# Only 8 files come back from a lent machine: the profiles' traces and HLO
# travel as one archive (machine E's NF-ResNet-50 HLO was left behind).
if [[ -d "${out}/f0" || -d "${out}/nfr50" ]]; then
  (cd "${out}" && tar -czf profiles.tgz $(ls -d f0 nfr50 2>/dev/null)) &&
    rm -rf "${out}/f0" "${out}/nfr50"
fi

echo '--- summary'
grep -h -E '"(comparison|kind": "summary)' "${out}"/*.jsonl
cat "${out}"/ablate_*.jsonl "${out}"/flags.jsonl "${out}"/thesis.jsonl \
  "${out}"/train_throughput.jsonl 2>/dev/null |
  grep -h -o -E '"impl": "[^"]*", "mode": "[a-z]*", "model": "[a-z0-9_]*"|"donate": [a-z]*|"kernel_layout": "[a-z]*"|"images_per_s": [0-9.]*|"peak_memory_gib": [0-9.a-z]*|"xla_flags": "[^"]*"|"error": "[^"]*"' |
  paste -sd' ' | sed 's/"impl"/\n"impl"/g'
for f in augment augment_base; do
  [[ -f "${out}/${f}.jsonl" ]] && echo "${f}: $(grep -o -E \
    '"ms_per_batch": [0-9.]*' "${out}/${f}.jsonl")"
done
tail -5 "${log}"
