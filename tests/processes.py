"""Launching one job as several local processes (jax.distributed on the CPU)."""

import os
import socket
import subprocess
import sys

# XLA's LLVM back end at its lowest optimization level: on the tiny test
# models compiling, not running, is most of the suite's time, and this level
# compiles a train step in about half the time (0.6x) and an init in a third.
# The programs compute the same functions; only their machine code differs.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices):
  """The tests' XLA_FLAGS for a process of `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


def process_flags(count):
  """Each rank's multi-process flags, around a free local port."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return [
      [
          f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={count}',
          f'--process_id={rank}',
      ]
      for rank in range(count)
  ]


def start(commands, **kwargs):
  """Starts each command; its output is read back as text."""
  return [
      subprocess.Popen(
          command,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          **kwargs,
      )
      for command in commands
  ]


def finish(procs, timeout=600):
  """Each process's (stdout, stderr), once all exited 0; kills hung ones."""
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=timeout))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  return outs


def python(code, cwd, timeout=300, **env):
  """Runs `code` in a fresh Python (on the CPU) from `cwd`; its result."""
  return subprocess.run(
      [sys.executable, '-c', code],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
  )
