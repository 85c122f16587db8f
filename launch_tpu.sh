#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod), runs experiment.py (or a
# sweep) on every worker, and shows, stops or deletes it. Run with --help for
# the usage text; add --dry-run to print every command instead of running it.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_ROOT
# Where the code, its log and the job's pid live on each worker (relative to
# the remote user's home directory, which is where gcloud's ssh and scp land).
readonly REMOTE_DIR="nfnets-jax"
readonly REMOTE_TARBALL="nfnets-jax.tar.gz"
readonly REMOTE_LOG="nfnets-jax.log"
readonly REMOTE_PID="nfnets-jax.pid"
readonly LOG_LINES=100
# libtpu releases older than the PyPI ones live here; pip ignores the page when
# PyPI already satisfies jax[tpu].
readonly LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/\
libtpu_releases.html"

usage() {
  cat <<EOF
Usage: ${PROG} <command> [options] [-- experiment.py/nfnets.sweep flags...]

Commands:
  create   Create the TPU VM:  gcloud compute tpus tpu-vm create.
  run      Copy this working tree to every worker, install jax[tpu] and
           requirements.txt there, then start
             python3 experiment.py --config=CONFIG --workdir=WORKDIR \\
                 --coordinator_address=auto [FLAGS]
           on all workers in the background (nohup; each worker logs to
           ~/${REMOTE_LOG}); 'auto' joins the workers into one run. The
           trainer resumes from the newest checkpoint in WORKDIR. After a
           preemption, 'delete' and 'create' the VM again (Spot and
           preemptible VMs cannot be restarted), then the same 'run'
           command resumes the job.
  status   Describe the TPU VM (state, health, workers' addresses).
  logs     Print the last ${LOG_LINES} lines of every worker's log.
  stop     Stop the job on every worker (SIGTERM: the workers agree on a
           step, save it and exit); the TPU VM keeps running.
  delete   Delete the TPU VM (no prompt).

Options (--opt VALUE and --opt=VALUE both work):
  --name NAME               TPU name (all commands).
  --zone ZONE               Zone, e.g. us-central2-b (all commands).
  --project PROJECT         Cloud project; default: gcloud's configured one.
  --accelerator-type TYPE   create: e.g. v3-32, v4-64, v5litepod-64, v5p-128.
  --version VERSION         create: TPU software (runtime) version. Default by
                            family, after Google's table of runtimes:
                              v2, v3, v4       tpu-ubuntu2204-base
                              v5litepod, v5e   v2-alpha-tpuv5-lite
                              v5p              v2-alpha-tpuv5
                              v6e              v2-alpha-tpuv6e
                            (The older tpu-vm-base image ships Python 3.8,
                            which current JAX does not support.)
  --spot                    create: a Spot VM (can be preempted at any time).
  --preemptible             create: a preemptible VM (runs 24 h at most).
  --config FILE[:ARG]       run: config relative to the repository root,
                            e.g. configs/nfnet.py:F0.
  --workdir DIR             run: checkpoints and metrics. Use gs://BUCKET/...
                            on pods: every worker must see the same directory
                            and it must outlive a preempted VM.
  --sweep NAME              run: the config file's sweep_NAME instead of one
                            run: python3 -m nfnets.sweep --config=CONFIG
                            --sweep=NAME --workdir_root=WORKDIR, each run
                            over every worker; the same command resumes it.
  --dry-run                 Print each command, shell-quoted after '+ ',
                            instead of running it. May appear anywhere
                            before '--'.
  -h, --help                Print this text and exit.

Everything after '--' goes to experiment.py (or nfnets.sweep) verbatim (run
only), but the process flags (--coordinator_address, --num_processes,
--process_id): run gives every worker --coordinator_address=auto.

Examples:
  tpu=(--name nf-f0 --zone us-central2-b)
  ${PROG} create "\${tpu[@]}" --accelerator-type v4-64 --spot
  ${PROG} run "\${tpu[@]}" --config configs/nfnet.py:F0 \\
      --workdir gs://my-bucket/nfnet_f0 -- --config.train.batch_size=4096
  ${PROG} run "\${tpu[@]}" --config configs/nf_resnet.py:50 \\
      --sweep agc_batch --workdir gs://my-bucket/sweeps
  ${PROG} logs "\${tpu[@]}"
  ${PROG} delete "\${tpu[@]}"
EOF
}

# Prints an error, and where the usage text is, on stderr; exits with status 2.
# (Not the whole text: 50 lines would bury the one that says what is wrong.)
usage_error() {
  printf '%s: error: %s\n' "${PROG}" "$1" >&2
  printf "Run '%s --help' for the usage text.\n" "${PROG}" >&2
  exit 2
}

die() {
  printf '%s: error: %s\n' "${PROG}" "$1" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "${PROG}" "$1" >&2
}

# Prints a command as one copy-pasteable shell line after '+ '.
show() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '+ %s\n' "${quoted% }"
}

# Runs a command, or only prints it under --dry-run. Real runs echo the command
# on stderr first so that a log of the launch shows what was done.
run_cmd() {
  if [[ "${dry_run}" == 1 ]]; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

# The default TPU software version for an accelerator type such as v4-64.
default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------
# Arguments.

command=""
name=""
zone=""
project=""
accelerator_type=""
version=""
spot=0
preemptible=0
config=""
workdir=""
sweep=""
dry_run=0
passthrough=()
given=()  # The options given, but --dry-run and --help.

while (($# > 0)); do
  arg="$1"
  shift
  case "${arg}" in
    --)
      passthrough=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) dry_run=1 ;;
    --spot)
      spot=1
      given+=("${arg}")
      ;;
    --preemptible)
      preemptible=1
      given+=("${arg}")
      ;;
    --name | --zone | --project | --accelerator-type | --version | --config | \
      --workdir | --sweep | --name=* | --zone=* | --project=* | \
      --accelerator-type=* | --version=* | --config=* | --workdir=* | --sweep=*)
      if [[ "${arg}" == *=* ]]; then
        opt="${arg%%=*}"
        value="${arg#*=}"
      else
        opt="${arg}"
        if (($# == 0)) || [[ "$1" == --* ]]; then
          usage_error "${opt} needs a value"
        fi
        value="$1"
        shift
      fi
      [[ -n "${value}" ]] || usage_error "${opt} needs a non-empty value"
      given+=("${opt}")
      case "${opt}" in
        --name) name="${value}" ;;
        --zone) zone="${value}" ;;
        --project) project="${value}" ;;
        --accelerator-type) accelerator_type="${value}" ;;
        --version) version="${value}" ;;
        --config) config="${value}" ;;
        --workdir) workdir="${value}" ;;
        --sweep) sweep="${value}" ;;
      esac
      ;;
    -*) usage_error "unknown option '${arg}'" ;;
    *)
      [[ -z "${command}" ]] || usage_error "unexpected argument '${arg}' \
(the command is '${command}'; experiment.py flags go after '--')"
      command="${arg}"
      ;;
  esac
done

[[ -n "${command}" ]] || usage_error "no command given"
case "${command}" in
  create | run | status | logs | stop | delete) ;;
  *) usage_error "unknown command '${command}'" ;;
esac

[[ -n "${name}" ]] || usage_error "${command} needs --name"
[[ -n "${zone}" ]] || usage_error "${command} needs --zone"
# Cloud TPU names: lowercase letters, digits and hyphens, starting with a
# letter. Checking here also keeps the name safe inside remote commands.
[[ "${name}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name '${name}' is not a valid TPU name (lowercase letters, \
digits and hyphens, starting with a letter)"
# And at most 63 of them, as every Google Cloud resource name (RFC 1035).
((${#name} <= 63)) ||
  usage_error "--name '${name}' is ${#name} characters long; TPU names have \
at most 63"
# An option the command does not read is refused, not ignored: 'run --spot'
# would otherwise start the job on whatever VM the name has.
case "${command}" in
  create) applies="--accelerator-type --version --spot --preemptible" ;;
  run) applies="--config --workdir --sweep" ;;
  *) applies="" ;;
esac
for opt in ${given[@]+"${given[@]}"}; do
  case " --name --zone --project ${applies} " in
    *" ${opt} "*) ;;
    *) usage_error "${opt} does not apply to ${command}" ;;
  esac
done
if ((${#passthrough[@]} > 0)) && [[ "${command}" != run ]]; then
  usage_error "flags after '--' are for experiment.py (or nfnets.sweep) and \
only apply to run"
fi
# run gives every worker --coordinator_address=auto; one --process_id for
# all workers could not work.
for arg in ${passthrough[@]+"${passthrough[@]}"}; do
  case "${arg}" in
    --coordinator_address* | --num_processes* | --process_id* | \
      -coordinator_address* | -num_processes* | -process_id*)
      usage_error "${arg%%=*} after '--': run starts every worker with \
--coordinator_address=auto, which finds the pod's processes itself"
      ;;
  esac
done

# Arguments every gcloud call shares.
common=("--zone=${zone}")
[[ -z "${project}" ]] || common+=("--project=${project}")
tpu_vm=(gcloud compute tpus tpu-vm)

# ---------------------------------------------------------------------------
# Commands.

cmd_create() {
  [[ -n "${accelerator_type}" ]] ||
    usage_error "create needs --accelerator-type (e.g. v4-64)"
  [[ "${accelerator_type}" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    usage_error "--accelerator-type '${accelerator_type}' is not of the form \
v4-64 or v5litepod-16"
  if [[ -z "${version}" ]]; then
    version="$(default_version "${accelerator_type}")" ||
      usage_error "no default --version for '${accelerator_type}'; pass \
--version (list: gcloud compute tpus tpu-vm versions list --zone=${zone})"
  fi
  ((spot + preemptible < 2)) ||
    usage_error "--spot and --preemptible exclude each other; choose one"
  local args=(create "${name}" "${common[@]}"
    "--accelerator-type=${accelerator_type}" "--version=${version}")
  ((spot == 0)) || args+=(--spot)
  ((preemptible == 0)) || args+=(--preemptible)
  run_cmd "${tpu_vm[@]}" "${args[@]}"
}

# Packs the working tree into $1: tracked files plus untracked ones that git
# does not ignore (so uncommitted edits travel, .venv and workdirs do not).
# Outside a git checkout, tars the tree minus the usual bulky directories.
# Plain tar options only, so that macOS's bsdtar works too.
make_tarball() {
  local tarball="$1"
  if git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local files=() file
    while IFS= read -r -d '' file; do
      # Tracked files deleted but not yet committed: nothing to pack.
      if [[ -e "${REPO_ROOT}/${file}" ]]; then
        files+=("${file}")
      fi
    done < <(git -C "${REPO_ROOT}" ls-files -z --cached --others \
      --exclude-standard)
    ((${#files[@]} > 0)) || die "git lists no files in ${REPO_ROOT}"
    run_cmd tar -czf "${tarball}" -C "${REPO_ROOT}" -- "${files[@]}"
  else
    run_cmd tar -czf "${tarball}" -C "${REPO_ROOT}" --exclude=./.git \
      --exclude=./.venv --exclude=./workdir --exclude=./workdirs \
      --exclude=__pycache__ .
  fi
}

# Bash, for the workers: succeeds when the job this script started still runs.
# (Checks the command line too: after a reboot the pid may belong to another.)
readonly JOB_ALIVE="[ -f ~/${REMOTE_PID} ] &&
  ps -p \"\$(cat ~/${REMOTE_PID})\" -o args= |
  grep -qE 'experiment[.]py|nfnets[.]sweep'"

cmd_run() {
  [[ -n "${config}" ]] ||
    usage_error "run needs --config (e.g. configs/nfnet.py:F0)"
  [[ -n "${workdir}" ]] ||
    usage_error "run needs --workdir (e.g. gs://BUCKET/nfnet_f0)"
  local config_file="${config%%:*}"
  [[ "${config_file}" != /* ]] ||
    usage_error "--config '${config}' must be relative to the repository root"
  [[ -f "${REPO_ROOT}/${config_file}" ]] ||
    usage_error "--config file '${config_file}' not found under ${REPO_ROOT}"
  if [[ -n "${sweep}" ]]; then
    sweep="${sweep#sweep_}" # as nfnets.sweep reads it
    [[ "${sweep}" =~ ^[A-Za-z0-9_]+$ ]] ||
      usage_error "--sweep '${sweep}' is not a sweep name (letters, digits, _)"
    grep -qw "sweep_${sweep}" "${REPO_ROOT}/${config_file}" ||
      usage_error "--sweep: ${config_file} defines no sweep_${sweep}()"
  fi
  [[ -f "${REPO_ROOT}/experiment.py" ]] ||
    die "${REPO_ROOT}/experiment.py not found: nothing to run on the workers"
  if [[ "${workdir}" != gs://* ]]; then
    warn "--workdir '${workdir}' is not gs://...: on a pod each worker writes \
its own local copy, and a preempted VM loses it (no resume)"
  fi

  local tarball
  if [[ "${dry_run}" == 1 ]]; then
    tarball="${TMPDIR:-/tmp}/${REMOTE_TARBALL}"
  else
    local tmp
    tmp="$(mktemp -d)"
    # Expanded now: the local variable is gone by the time EXIT fires.
    # shellcheck disable=SC2064
    trap "rm -rf -- '${tmp}'" EXIT
    tarball="${tmp}/${REMOTE_TARBALL}"
  fi
  make_tarball "${tarball}"

  run_cmd "${tpu_vm[@]}" scp "${tarball}" "${name}:${REMOTE_TARBALL}" \
    "${common[@]}" --worker=all

  # Refuses to start a second job beside a live one (it could not get the TPU
  # anyway). Unpacks over the previous copy rather than deleting it, so that a
  # local --workdir inside it survives.
  local setup
  setup="$(
    cat <<EOF
set -e
if ${JOB_ALIVE}; then
  echo "\$(hostname): a job is still running; use '${PROG} stop' first" >&2
  exit 1
fi
mkdir -p ~/${REMOTE_DIR}
tar -xzf ~/${REMOTE_TARBALL} -C ~/${REMOTE_DIR}
cd ~/${REMOTE_DIR}
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet --upgrade 'jax[tpu]' -f ${LIBTPU_INDEX} \\
  -r requirements.txt
EOF
  )"
  run_cmd "${tpu_vm[@]}" ssh "${name}" "${common[@]}" --worker=all \
    "--command=${setup}"

  # The workers join one run through jax.distributed (JAX finds the pod's
  # hosts), whose preemption service makes them all stop at the same step on
  # SIGTERM ('stop', a preemption); without it they would hang.
  local job=(python3 experiment.py "--config=${config}" "--workdir=${workdir}")
  if [[ -n "${sweep}" ]]; then
    job=(python3 -m nfnets.sweep "--config=${config}" "--sweep=${sweep}"
      "--workdir_root=${workdir}")
  fi
  local experiment
  # ${a[@]+"${a[@]}"}: an empty array trips `set -u` in bash 3 (macOS).
  printf -v experiment '%q ' "${job[@]}" --coordinator_address=auto \
    ${passthrough[@]+"${passthrough[@]}"}
  # stdin, stdout and stderr all redirected: ssh returns at once and the job
  # outlives the session.
  local launch
  launch="$(
    cat <<EOF
set -e
cd ~/${REMOTE_DIR}
echo "=== \$(date -u +%FT%TZ) \$(hostname) starts:" >> ~/${REMOTE_LOG}
echo ${experiment}>> ~/${REMOTE_LOG}
nohup ${experiment}>> ~/${REMOTE_LOG} 2>&1 < /dev/null &
echo \$! > ~/${REMOTE_PID}
echo "\$(hostname): started pid \$!, logging to ~/${REMOTE_LOG}"
EOF
  )"
  run_cmd "${tpu_vm[@]}" ssh "${name}" "${common[@]}" --worker=all \
    "--command=${launch}"
}

cmd_status() {
  run_cmd "${tpu_vm[@]}" describe "${name}" "${common[@]}"
}

cmd_logs() {
  local tail_logs="tail -n ${LOG_LINES} ~/${REMOTE_LOG} |
  sed \"s/^/[\$(hostname)] /\""
  run_cmd "${tpu_vm[@]}" ssh "${name}" "${common[@]}" --worker=all \
    "--command=${tail_logs}"
}

cmd_stop() {
  local stop
  stop="$(
    cat <<EOF
if ${JOB_ALIVE}; then
  kill "\$(cat ~/${REMOTE_PID})" && echo "\$(hostname): stopped"
else
  echo "\$(hostname): no job running"
fi
EOF
  )"
  run_cmd "${tpu_vm[@]}" ssh "${name}" "${common[@]}" --worker=all \
    "--command=${stop}"
}

cmd_delete() {
  run_cmd "${tpu_vm[@]}" delete "${name}" "${common[@]}" --quiet
}

"cmd_${command}"
