"""Launching one job as several local processes (jax.distributed on the CPU)."""

import socket
import subprocess


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
