"""Host batch layout and the iterator every pipeline returns.

A global batch is split evenly over processes, then over each process's local
devices, so a host batch is shaped `[local_devices, per_device, ...]`, the
layout a pmapped step consumes. This module holds that arithmetic and the small
iterator class shared by the numpy (digits) and tf.data pipelines; it imports
neither JAX nor TensorFlow.
"""

import dataclasses
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

Batch = Dict[str, np.ndarray]

# ImageNet statistics of RGB pixels in [0, 255] (the usual torchvision values,
# also used by the original NFNets release).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

SPLITS = ('train', 'eval')
# `cfg.name` of an image folder: 'folder:/path/to/root'.
FOLDER_PREFIX = 'folder:'


@dataclasses.dataclass(frozen=True)
class HostLayout:
  """How one process's share of a global batch is laid out on its devices."""

  global_batch_size: int
  process_index: int
  process_count: int
  local_device_count: int

  @property
  def process_batch_size(self) -> int:
    """Examples per step on this process."""
    return self.global_batch_size // self.process_count

  @property
  def device_batch_size(self) -> int:
    """Examples per step on each device."""
    return self.process_batch_size // self.local_device_count


def host_layout(
    global_batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    local_device_count: Optional[int] = None,
) -> HostLayout:
  """Checks the batch/device arithmetic; unset counts come from JAX.

  Args:
    global_batch_size: examples per step over all processes and devices.
    process_index: this process, in `[0, process_count)`; default
      `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    local_device_count: devices on this process; default
      `jax.local_device_count()`.

  Returns:
    The validated `HostLayout`.

  Raises:
    ValueError: if the global batch does not split evenly over all devices, or
      a count is out of range.
  """
  if None in (process_index, process_count, local_device_count):
    # Imported here: the data package must not pull JAX in for callers that
    # give every count explicitly (tests, benchmarks, other frameworks).
    import jax  # pylint: disable=g-import-not-at-top

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if local_device_count is None:
      local_device_count = jax.local_device_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} must lie in [0, process_count='
        f'{process_count}).'
    )
  if local_device_count < 1:
    raise ValueError(f'local_device_count={local_device_count} must be >= 1.')
  num_devices = process_count * local_device_count
  if global_batch_size < 1 or global_batch_size % num_devices:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the device'
        f' count {num_devices} ({process_count} processes x'
        f' {local_device_count} local devices); choose a multiple of'
        f' {num_devices}.'
    )
  return HostLayout(
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
      local_device_count=local_device_count,
  )


def shard_indices(num: int, process_index: int, process_count: int):
  """Indices of the examples of a split that one process reads.

  Strided, so that a split stored sorted by class (image folders) still gives
  every process every class; the shards are disjoint and cover `range(num)`.

  Args:
    num: examples in the split.
    process_index: this process.
    process_count: number of processes.

  Returns:
    int64 array of this process's example indices, increasing.
  """
  return np.arange(process_index, num, process_count, dtype=np.int64)


def eval_num_batches(num_examples: int, layout: HostLayout) -> int:
  """Eval steps per pass: enough for the largest process shard.

  Every process must run the same number of steps (each is a collective over
  all devices), so processes with fewer examples pad more.

  Args:
    num_examples: examples in the whole eval split.
    layout: the host layout.

  Returns:
    The number of host batches per eval pass.
  """
  largest_shard = -(-num_examples // layout.process_count)
  return -(-largest_shard // layout.process_batch_size)


class Batches:
  """Iterator of host batches (dicts of numpy arrays `[devices, batch, ...]`).

  A train stream is infinite. An eval stream is finite; iterating it again
  after it is exhausted (e.g. a second `for` loop over the same object) starts
  a fresh pass over the split, so one object can serve every evaluation.

  Attributes:
    split: `'train'` or `'eval'`.
    num_examples: examples in the whole split (all processes).
    layout: the `HostLayout` (batch sizes, process and device counts).
    num_batches: host batches per eval pass (`None` for train).
    start_step: the step the train stream starts at (0 for eval).
  """

  def __init__(
      self,
      make_iterator: Callable[[], Iterator[Batch]],
      *,
      split: str,
      num_examples: int,
      layout: HostLayout,
      num_batches: Optional[int] = None,
      start_step: int = 0,
      source: Any = None,
  ):
    self._make_iterator = make_iterator
    self._iterator = make_iterator()
    self._exhausted = False
    self.split = split
    self.num_examples = num_examples
    self.layout = layout
    self.num_batches = num_batches
    self.start_step = start_step
    # Whatever produced the batches (e.g. the tf.data.Dataset), for debugging
    # and benchmarks; not part of the contract with the runner.
    self.source = source

  def __iter__(self) -> 'Batches':
    if self._exhausted:
      self._iterator = self._make_iterator()
      self._exhausted = False
    return self

  def __next__(self) -> Batch:
    try:
      return next(self._iterator)
    except StopIteration:
      self._exhausted = True
      raise

  def __repr__(self) -> str:
    return (
        f'Batches(split={self.split!r}, num_examples={self.num_examples},'
        f' global_batch_size={self.layout.global_batch_size},'
        f' local_devices={self.layout.local_device_count},'
        f' per_device={self.layout.device_batch_size})'
    )
