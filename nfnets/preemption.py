"""Stopping a run on SIGTERM or Ctrl-C at a step that it saves.

One process: a Python handler, set for the training loop, turns the signals
into a flag that the loop reads between steps.

Under jax.distributed every process must stop at the same step: one that
stopped alone would wait in the checkpoint's barrier while the others wait
in the next step's all-reduce, and the job would hang (signals reach the
hosts at different steps, as with `launch_tpu.sh stop`). There JAX's
preemption service agrees on the step: its own handler catches SIGTERM on
any process, and asked once a step, it answers yes on every process at the
same question. The questions are counted here, per process, so the counts
agree as long as every process asks the same questions, and the first is
asked as soon as jax.distributed starts (`start_listening`): a notice before
any question is lost by the service.
"""

import itertools
import os
import signal

import jax
from jax.experimental import multihost_utils

# Questions this process asked the service, over all its runs (a sweep
# trains several in one process).
_questions = itertools.count()
# Whether the service has told this process to stop. It answers one notice
# in a process's life, at one question, so the answer is kept: a sweep's next
# run, started after the notice, stops too (after its first step), and so
# does any later run in this process, since no signal could stop it.
_noticed = False

# The SIGINT handler that Ctrl-C forwarding replaced, to give back.
_original_sigint = None

_SERVICE_OFF = (
    "This run has several processes and JAX's preemption service is off, so"
    ' a preemption of one host would hang the others: set'
    ' jax_enable_preemption_service to True before jax.distributed starts.'
)


def _distributed_initialized() -> bool:
  is_initialized = getattr(jax.distributed, 'is_initialized', None)
  if is_initialized is not None:
    return is_initialized()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return distributed.global_state.client is not None  # older JAX


def _ask() -> bool:
  """Asks the service whether to stop now; raises RuntimeError without it."""
  global _noticed
  if not _noticed:
    _noticed = multihost_utils.reached_preemption_sync_point(next(_questions))
  return _noticed


def _forward(signum, frame):
  """Ctrl-C, passed on to JAX's SIGTERM handler (and so to every process)."""
  del frame
  print(
      f'Received signal {signum}: passing it on to every process.',
      flush=True,
  )
  os.kill(os.getpid(), signal.SIGTERM)


def _forward_ctrl_c() -> None:
  global _original_sigint
  if signal.getsignal(signal.SIGINT) is _forward:
    return
  try:
    _original_sigint = signal.signal(signal.SIGINT, _forward)
  except ValueError:  # not the main thread: leave signals alone
    pass


def _give_back_ctrl_c() -> None:
  global _original_sigint
  if signal.getsignal(signal.SIGINT) is _forward:
    signal.signal(signal.SIGINT, _original_sigint)
  _original_sigint = None


def start_listening() -> None:
  """Asks the first question, right after jax.distributed starts.

  Every process must call it at the same point (`cli.initialize_processes`
  does). From then on Ctrl-C is passed on to the service too, until a
  run's loop ends. Without jax.distributed, or without its service, it does
  nothing.
  """
  if _distributed_initialized():
    try:
      _ask()
    except RuntimeError:  # no service: `check_processes` refuses that
      return
    _forward_ctrl_c()


def release_signals() -> None:
  """SIGTERM and Ctrl-C end this process again; for work with nothing to save.

  (`experiment.py --mode=eval`: under jax.distributed, JAX's handler would
  hold SIGTERM for a training loop that never comes.)
  """
  _give_back_ctrl_c()
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  except ValueError:  # not the main thread: leave signals alone
    pass


def check_processes() -> None:
  """Refuses several processes that could not agree on when to stop.

  Raises:
    ValueError: several processes without jax.distributed, or with JAX's
      preemption service off.
  """
  if jax.process_count() == 1:
    return
  if not _distributed_initialized():
    raise ValueError(
        f'This run has {jax.process_count()} processes but'
        ' jax.distributed is not initialized, so a preemption of one host'
        ' would hang the others: give experiment.py or nfnets.sweep'
        ' --coordinator_address=auto (a Cloud TPU pod, SLURM, Open MPI) or'
        ' host:port with --num_processes and --process_id, or call'
        ' jax.distributed.initialize() first.'
    )
  if not getattr(jax.config, 'jax_enable_preemption_service', True):
    raise ValueError(_SERVICE_OFF)


class Watch:
  """One run's watch for SIGTERM/SIGINT; `reached` is asked once a step.

  Under jax.distributed (one process too: launch_tpu.sh on a one-host TPU
  VM, where JAX's handler holds SIGTERM from the start) Ctrl-C is passed on
  to the service as SIGTERM until the end of the loop (`__exit__`); after
  it, Ctrl-C interrupts the final evaluation as without jax.distributed.
  Without it, the loop (`with watch:`) turns both signals into a flag.
  """

  def __init__(self):
    check_processes()
    self.requested = False
    self._previous = {}
    self._shared = _distributed_initialized()
    # Told to stop before this run began: see `_noticed`.
    self.noticed_before = False
    if not self._shared:
      return
    try:
      # A notice from now on (restoring, compiling) stops every process
      # after the first step.
      self.noticed_before = _ask()
    except RuntimeError:  # jax.distributed started without the service
      if jax.process_count() > 1:
        raise ValueError(_SERVICE_OFF) from None
      self._shared = False
      return
    _forward_ctrl_c()

  def __enter__(self):
    if not self._shared:
      for sig in (signal.SIGTERM, signal.SIGINT):
        try:
          self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
          pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(
        f'Received signal {signum}: saving a checkpoint and exiting.',
        flush=True,
    )

  def reached(self) -> bool:
    """Whether to save and stop now; asked once a step by every process."""
    return _ask() if self._shared else self.requested

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    self.close()

  def close(self):
    """Gives Ctrl-C back to Python (a KeyboardInterrupt); idempotent."""
    if self._shared:
      _give_back_ctrl_c()
