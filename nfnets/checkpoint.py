"""Checkpoints: the published DeepMind weights, and our own training state.

The published NFNet files (`F0_haiku.npz` ... `F6_haiku.npz`) are, despite
their extension, pickles of a `{module_path: {param_name: float32 ndarray}}`
dict. Unpickling runs code named by the file, so a file from the internet is
read with a restricted unpickler that admits only dicts, numpy arrays and
scalars, and refuses anything else before it runs.
"""

import http.client
import inspect
import io
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile
from typing import Any, Mapping, Optional, Sequence

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models

# The only globals a plain pickle of numpy arrays in dicts needs.
_SAFE_GLOBALS = frozenset(
    {
        ('numpy.core.multiarray', '_reconstruct'),
        ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'),
        ('numpy._core.multiarray', 'scalar'),
        ('numpy', 'ndarray'),
        ('numpy', 'dtype'),
        ('_codecs', 'encode'),
        ('collections', 'OrderedDict'),
        ('builtins', 'dict'),
    }
)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """The file asks to call something other than numpy array reconstruction.

  A ValueError too: like any other bad value a user gives, the command line
  reports it in one line.
  """


class CheckpointMismatchError(ValueError):
  """A readable checkpoint holds a state of another structure or shapes."""


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return super().find_class(module, name)
    raise UnsafePickleError(
        f'refusing to load {module}.{name}: only dicts, numpy arrays and '
        'scalars are allowed in a parameter file'
    )


def safe_load_pickle(data: bytes) -> Any:
  """Unpickles `data`, admitting only dicts, numpy arrays and scalars."""
  return _RestrictedUnpickler(io.BytesIO(data)).load()


# The published NFNet weights, as the NFNets release's README links them.
PUBLISHED_URL = 'https://storage.googleapis.com/dm-nfnets/{name}_haiku.npz'
PUBLISHED_NAMES = ('F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6')


def cache_dir() -> str:
  """Where downloaded weights are kept: $NFNETS_JAX_CACHE, else a user cache.

  The default is `$XDG_CACHE_HOME/nfnets-jax` (`~/.cache/nfnets-jax`).
  """
  if os.environ.get('NFNETS_JAX_CACHE'):
    return os.path.expanduser(os.environ['NFNETS_JAX_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return os.path.join(os.path.expanduser(base), 'nfnets-jax')


def names_published(source: str) -> bool:
  """Whether `source` names published weights ('F0' ... 'F6', no such path)."""
  return source.upper() in PUBLISHED_NAMES and not epath.Path(source).exists()


# A partial download older than this is a dead process's: a live one writes
# every few seconds.
_STALE_PARTIAL_S = 3600


def _remove_stale_partials(folder: str, name: str) -> None:
  for entry in os.scandir(folder):
    if entry.name.startswith(f'{name}.') and entry.name.endswith('.part'):
      try:
        if time.time() - entry.stat().st_mtime > _STALE_PARTIAL_S:
          os.remove(entry.path)
      except OSError:  # Removed by another process meanwhile.
        pass


def published_file(source: str, log=None) -> str:
  """`source`, or the local copy of the published weights it names.

  A `source` that exists is returned as it is. 'F0' ... 'F6' (any case)
  name the published NFNet weights: the first use downloads
  `F<k>_haiku.npz` into `cache_dir()`, through a temporary file of its own
  (processes on hosts that share the folder do not collide) renamed when
  whole, so that an interrupted download leaves nothing to mistake for the
  file. Each process that needs the file and finds none downloads it.
  Loading it checks it (`load_deepmind_params`).

  Args:
    source: a path, or a published name.
    log: a function of one string, told of a download (default: stderr).

  Raises:
    FileNotFoundError: the download failed, or the cache folder cannot be
      written; the message says which, and gives the URL.
  """
  if not names_published(source):
    return source
  name = source.upper()
  folder = cache_dir()
  filename = f'{name}_haiku.npz'
  path = os.path.join(folder, filename)
  if os.path.isfile(path):
    return path
  url = PUBLISHED_URL.format(name=name)
  try:
    os.makedirs(folder, exist_ok=True)
    _remove_stale_partials(folder, filename)
    handle, partial = tempfile.mkstemp(
        dir=folder, prefix=f'{filename}.', suffix='.part'
    )
  except OSError as e:
    raise FileNotFoundError(
        f'The weights cache {folder} cannot be written ({e}); set'
        ' NFNETS_JAX_CACHE to a folder you can write, or download'
        f' {url} by hand and give its path instead of {source!r}.'
    ) from None
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  log(f'Downloading the published {name} weights from {url} to {path}.')
  try:
    with os.fdopen(handle, 'wb') as f:
      with urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, f, 1 << 20)
        size = f.tell()
        # http.client ends a read cut short by a closed connection quietly.
        expected = response.headers.get('Content-Length')
      if expected is not None and size != int(expected):
        raise ValueError(f'the transfer stopped at {size} of {expected} bytes')
    with open(partial, 'rb') as f:
      head = f.read(2)
    # The published files are pickles (protocol 2+); a proxy's or portal's
    # page is not.
    if head[:1] != b'\x80' and head != b'PK':
      raise ValueError(f'what came back is not a parameter file ({head!r}...)')
    os.replace(partial, path)
  # URLError and HTTPError are OSErrors; a connection closed early raises
  # http.client.IncompleteRead.
  except (OSError, ValueError, http.client.HTTPException) as e:
    reason = getattr(e, 'reason', None) or e
    raise FileNotFoundError(
        f'Could not download {url} to {path} ({reason}); download it by'
        f' hand and give its path instead of {source!r}.'
    ) from None
  finally:
    # Whatever stopped it, Ctrl-C too, leaves no partial file behind.
    if os.path.exists(partial):
      os.remove(partial)
  return path


def read_params_file(path: str) -> dict[str, dict[str, np.ndarray]]:
  """A parameter file's `{module: {param: array}}`, unchecked.

  `load_deepmind_params` checks it against a model; this is for callers
  that take part of it (fine-tuning).

  Raises:
    FileNotFoundError: no file at `path`.
    UnsafePickleError: the file would call code while loading.
    ValueError: the file is corrupt or holds something else.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'No parameter file at {path!r}.')
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'PK':
    # A real .npz archive with 'module_path/param_name' keys.
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        tree = {}
        for key in archive.files:
          module, _, name = key.rpartition('/')
          tree.setdefault(module, {})[name] = archive[key]
        return tree
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise ValueError(
          f'{path} is not a readable .npz parameter file '
          f'(corrupt or truncated?): {type(e).__name__}: {e}'
      ) from None
  try:
    tree = safe_load_pickle(data)
  except UnsafePickleError as e:
    raise UnsafePickleError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'{path} is not a readable parameter file '
        f'(corrupt or truncated?): {e}'
    ) from None
  if not isinstance(tree, Mapping) or not all(
      isinstance(v, Mapping) for v in tree.values()
  ):
    raise ValueError(
        f'{path} does not hold a {{module: {{param: array}}}} ' 'dict.'
    )
  return {m: {p: np.asarray(v) for p, v in d.items()} for m, d in tree.items()}


def expected_param_shapes(
    model_name: str, num_classes: int = 1000, **overrides
) -> dict[str, dict[str, tuple]]:
  """The parameter tree shapes of a registry model, without allocating."""

  def forward(x):
    return models.create(model_name, num_classes, **overrides)(
        x, is_training=True
    )

  transformed = hk.transform_with_state(forward)
  params, _ = jax.eval_shape(
      transformed.init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  return {
      m: {p: tuple(v.shape) for p, v in d.items()} for m, d in params.items()
  }


def check_params(
    params: Mapping[str, Mapping[str, Any]],
    expected: Mapping[str, Mapping[str, tuple]],
    where: str = 'params',
) -> None:
  """Raises ValueError naming the first path whose presence or shape differs."""
  paths = sorted(
      {(m, p) for m, d in expected.items() for p in d}
      | {(m, p) for m, d in params.items() for p in d}
  )
  for module, name in paths:
    want = expected.get(module, {}).get(name)
    got = params.get(module, {}).get(name)
    got_shape = None if got is None else tuple(np.shape(got))
    if want is None:
      raise ValueError(
          f'{where}: unexpected parameter {module}/{name} with '
          f'shape {got_shape} (the model has none).'
      )
    if got is None:
      raise ValueError(
          f'{where}: missing parameter {module}/{name}; the model '
          f'expects shape {want}.'
      )
    if got_shape != tuple(want):
      raise ValueError(
          f'{where}: {module}/{name} has shape {got_shape}, the '
          f'model expects {tuple(want)}.'
      )


def load_deepmind_params(
    path: str, model_name: str, num_classes: int = 1000, **overrides
) -> dict[str, dict[str, np.ndarray]]:
  """Loads a published DeepMind parameter file for registry model `model_name`.

  Args:
    path: e.g. `F0_haiku.npz` (a pickle) or a real `.npz` with
      'module_path/param_name' keys.
    model_name: registry name, e.g. 'nfnet_f0'.
    num_classes: classifier outputs of the checkpoint.
    **overrides: constructor overrides the checkpoint was trained with.

  Returns:
    Haiku params `{module_path: {param_name: float32 ndarray}}`.

  Raises:
    UnsafePickleError: the file would call code while loading.
    ValueError: a parameter is missing, extra or of the wrong shape (the
      message names the first one and both shapes), or the file is corrupt.
  """
  expected = expected_param_shapes(model_name, num_classes, **overrides)
  return checked_params(
      read_params_file(path), expected, where=f'{path} as {model_name}'
  )


def checked_params(
    params: Mapping[str, Mapping[str, Any]],
    expected: Mapping[str, Mapping[str, tuple]],
    where: str,
) -> dict[str, dict[str, np.ndarray]]:
  """`params` as float32 numpy, once `check_params` has found them whole."""
  check_params(params, expected, where=where)
  return {
      m: {p: np.asarray(v, dtype=np.float32) for p, v in d.items()}
      for m, d in params.items()
  }


class _FailedReadEchoes(logging.Filter):
  """Drops asyncio's 'never retrieved' reports of a restore's failed reads.

  When a truncated checkpoint fails several of a restore's reads at once, the
  restore raises the first and asyncio later logs each of the others, with a
  traceback, as 'Task exception was never retrieved' when its task is
  collected: whenever the garbage collector gets to it, during or well after
  the restore. Only reports whose error names a checkpoint directory this
  process restored from are dropped; every other record goes on.
  """

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if not str(record.msg).startswith('Task exception was never retrieved'):
      return True
    if not record.exc_info:
      return True
    text = str(record.exc_info[1])
    return not any(d in text for d in self.directories)


_FAILED_READ_ECHOES = _FailedReadEchoes()


def _silence_failed_restore_echoes(directory: str) -> None:
  """Silences the echoes of a failed orbax restore from `directory`.

  A failed restore echoes twice, a traceback per array: hundreds of them
  around the one warning that says what happened.

  1. When one read fails, orbax's event loop closes while TensorStore's other
     reads are still in flight; each of their completion callbacks then
     raises 'Event loop is closed' into `sys.unraisablehook`. Every other
     unraisable exception goes on as before.
  2. The other reads that fail too are logged by asyncio (see
     `_FailedReadEchoes`).

  Both can start before the failed restore returns, so this is called before
  every restore.
  """
  _FAILED_READ_ECHOES.directories.add(directory)
  asyncio_logger = logging.getLogger('asyncio')
  if _FAILED_READ_ECHOES not in asyncio_logger.filters:
    asyncio_logger.addFilter(_FAILED_READ_ECHOES)
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_closed_loops', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  hook.ignores_closed_loops = True
  sys.unraisablehook = hook


def _path_name(path) -> str:
  """'opt_state/1/0/trace/linear/w' for a tree path, whatever the containers.

  Orbax saves named tuples as dicts and tuples as lists, so only the keys,
  indices and attribute names are compared.
  """
  parts = []
  for key in path:
    for attribute in ('key', 'idx', 'name'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _host_zeros(tree) -> Any:
  """Host zeros of each leaf's shape and dtype: what a restore fills.

  Leaves are arrays (or scalars) or orbax's array metadata. Host arrays, not
  the devices a checkpoint was saved from, which may not exist here.
  """

  def zeros(leaf):
    leaf = leaf if hasattr(leaf, 'shape') else np.asarray(leaf)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map(zeros, tree)


def _with_other_fields(abstract: dict, metadata, fields) -> dict:
  """`abstract` (the `fields`) plus the saved dict's other keys, as saved."""
  full = dict(abstract)
  for key, value in dict(metadata).items():
    if key not in fields:
      full[key] = _host_zeros(value)
  return full


def _shapes_by_path(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(leaf.shape) for p, leaf in flat}


def _first_difference(saved: dict, wanted: dict) -> str:
  """How a checkpoint's arrays differ from the state's, or '' if they agree.

  Parameter paths are dict keys, spelled alike by every orbax version, so a
  parameter missing, extra or reshaped is named. Elsewhere (the optimizer's
  state) orbax versions spell containers differently, so only the number of
  arrays and the shapes of paths both sides spell alike are compared.

  Args:
    saved: `{path: shape}` of the checkpoint.
    wanted: `{path: shape}` of the state this config builds.
  """
  params = sorted(
      p for p in saved.keys() | wanted.keys() if p.startswith('params/')
  )
  for path in params:
    if path not in wanted:
      return f'{path} is saved, and this config has no such parameter'
    if path not in saved:
      return f'{path} is not saved; this config has it, shape {wanted[path]}'
    if saved[path] != wanted[path]:
      return _reshaped(path, saved, wanted)
  if len(saved) != len(wanted):
    return f'{len(saved)} arrays are saved, this config has {len(wanted)}'
  for path in sorted(saved.keys() & wanted.keys()):
    if saved[path] != wanted[path]:
      return _reshaped(path, saved, wanted)
  return ''


def _reshaped(path: str, saved: dict, wanted: dict) -> str:
  return (
      f'{path} is saved with shape {saved[path]}, this config has'
      f' {wanted[path]}'
  )


def _manager_class(ocp):
  """Orbax's CheckpointManager, leaving JAX's preemption service alone.

  Orbax asks the service about each step it saves, only to log it, and from
  a thread of its own. The training loop asks it once a step and relies on
  the service seeing its count alone (`nfnets.preemption`): a call with
  another number in between can make a process miss the step every process
  agreed to stop at, and the job hangs.
  """

  class Manager(ocp.CheckpointManager):

    def reached_preemption(self, step: int) -> bool:
      del step
      return False

  return Manager


class TrainCheckpointer:
  """Orbax checkpoints of the training state in `<workdir>/checkpoints`.

  Keeps the newest `keep` steps. `restore_latest` falls back to an older
  step, with a warning, when the newest cannot be read (a job killed while
  writing, a truncated file), so a corrupt checkpoint never loses the run.
  """

  def __init__(self, workdir: str, keep: int = 3):
    """Opens (and creates) the checkpoint folder.

    Args:
      workdir: the run's folder, local or `gs://`.
      keep: how many of the newest checkpoints to keep, >= 1.
    """
    # Imported here: orbax is slow to import and only training needs it.
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if keep < 1:
      raise ValueError(f'keep_checkpoints must be >= 1, got {keep}.')
    self._ocp = ocp
    workdir = os.fspath(workdir)
    if '://' not in workdir:
      # Orbax refuses relative paths; the command line gives them.
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, 'checkpoints')
    # The steps the last `restore_latest` could not read.
    self.unreadable: list[int] = []
    self._manager = _manager_class(ocp)(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        # Named so that `item_metadata` can read a step's shapes unrestored.
        item_handlers=ocp.StandardCheckpointHandler(),
    )

  def all_steps(self) -> list[int]:
    """Steps with a finished checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any, wait: bool = False) -> None:
    """Saves `tree` (numpy or jax arrays) as step `step`."""
    self._manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore_latest(
      self,
      target: Any,
      log=None,
      step: Optional[int] = None,
      fields: Optional[Sequence[str]] = None,
  ):
    """Restores the newest readable checkpoint into `target`'s structure.

    A checkpoint that cannot be read (a truncated file, missing metadata) is
    skipped with a warning. One that reads but holds another state (another
    model, class count or optimizer) is an error, not skipped: training on
    would start afresh and let the new run's saves delete the old run's
    checkpoints.

    Args:
      target: a tree of arrays with the saved structure, shapes and dtypes;
        None: the checkpoint's own (its metadata's), compared with nothing.
      log: a function of one string for warnings (default: print).
      step: restore this step only (an error if it is missing or cannot be
        read) instead of the newest readable one.
      fields: restore only these top-level keys of the saved dict, which
        `target` then holds (and is compared on): e.g. the parameters for
        evaluation, whatever optimizer or loss scaling the run trained with.
        The other keys are read as saved and dropped.

    Returns:
      `(tree, step)`, or `(None, None)` when no checkpoint can be read (none
      at all, or `unreadable` lists them all). With `fields`, `tree` holds
      those keys only. `self.unreadable` lists the steps skipped, newest
      first: all newer than `step`.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint's paths or
        shapes differ from `target`'s; the message names the first one.
      FileNotFoundError: `step` has no finished checkpoint.
      ValueError: `step`'s checkpoint cannot be read.
    """
    log = log or print
    self.unreadable = []
    self._manager.wait_until_finished()
    abstract = None if target is None else _host_zeros(target)
    wanted = None if target is None else _shapes_by_path(abstract)
    chosen = lambda shapes: shapes
    if fields is not None:
      prefixes = tuple(f'{f}/' for f in fields)
      chosen = lambda shapes: {
          p: s for p, s in shapes.items() if p.startswith(prefixes)
      }
      wanted = None if wanted is None else chosen(wanted)
    candidates = self.all_steps()
    if step is not None:
      if step not in candidates:
        raise FileNotFoundError(
            f'No finished checkpoint {step} in {self.directory}; it has'
            f' {candidates or "none"}.'
        )
      candidates = [step]

    def unreadable(candidate, error):
      if step is not None:  # Asked for: no older one to fall back to.
        raise ValueError(
            f'Checkpoint {candidate} in {self.directory} is unreadable'
            f' ({type(error).__name__}:'
            f' {str(error).splitlines()[0][:200]}).'
        ) from None
      self.unreadable.append(candidate)
      self._warn_unreadable(log, candidate, error)

    for candidate in reversed(candidates):
      # Before the reads, not after: when one read fails, the other reads'
      # callbacks can fire while the error is still propagating. Reading the
      # metadata of a cut manifest fails that way too.
      _silence_failed_restore_echoes(self.directory)
      try:
        metadata = self._manager.item_metadata(candidate)
        # Newer orbax wraps the tree; older versions return it.
        metadata = getattr(metadata, 'tree', metadata)
        saved = chosen(_shapes_by_path(metadata))
        if not saved:
          raise ValueError('no array metadata')
      except Exception as e:  # pylint: disable=broad-except
        unreadable(candidate, e)
        continue
      problem = wanted is not None and _first_difference(saved, wanted)
      if problem:
        causes = (
            'another model, class count, optimizer or loss scaling'
            if fields is None
            else 'another model or class count'  # all that shapes `fields`
        )
        raise CheckpointMismatchError(
            f'Checkpoint {candidate} in {self.directory} holds another state'
            f' than this config builds ({problem}): it was written by a run'
            f' with {causes}.'
        )
      if fields is not None and abstract is None:
        abstract = _host_zeros(
            {k: v for k, v in dict(metadata).items() if k in fields}
        )
      partial = fields is not None and self._partial_reads
      if abstract is None:
        restore_into = _host_zeros(metadata)
      elif fields is None or partial:
        restore_into = abstract
      else:
        restore_into = _with_other_fields(abstract, metadata, fields)
      try:
        if partial:
          tree = self._read_fields(candidate, restore_into)
        else:
          tree = self._manager.restore(
              candidate, args=self._ocp.args.StandardRestore(restore_into)
          )
      except Exception as e:  # pylint: disable=broad-except
        unreadable(candidate, e)
        continue
      if fields is not None:
        tree = {f: tree[f] for f in fields if f in tree}
      return jax.tree_util.tree_map(np.asarray, tree), candidate
    return None, None

  @property
  def _partial_reads(self) -> bool:
    """Whether this orbax can read some of a checkpoint's keys alone."""
    return (
        'partial_restore'
        in inspect.signature(self._ocp.args.PyTreeRestore).parameters
    )

  def _read_fields(self, step: int, item: dict) -> dict:
    """Reads `item`'s keys of checkpoint `step`, and no other array.

    Evaluating or fine-tuning from a run needs its parameters, not its
    optimizer state or EMA: reading those too would take twice to three
    times the host memory and time (F7: ~1.5 GB a copy). The checkpoints are
    orbax's standard PyTree item, which its PyTree reader can read in part.
    """
    reader = self._ocp.PyTreeCheckpointer()
    try:
      return reader.restore(
          epath.Path(self.directory)
          / str(step)
          / self._ocp.checkpoint_manager.DEFAULT_ITEM_NAME,
          args=self._ocp.args.PyTreeRestore(item, partial_restore=True),
      )
    finally:
      reader.close()

  def set_aside(self, steps: Sequence[int]) -> list[str]:
    """Renames these steps' folders to `<step>.unreadable`, which orbax skips.

    For a run that resumes from an older step than an unreadable one: the
    manager counts the unreadable step as saved, so training would never
    write it again, and `keep` would delete readable checkpoints before it.
    Its files stay, renamed (`.unreadable.1`, ... if that name is taken).
    One process of a multi-host run calls this; every process then calls
    `reload`.

    Args:
      steps: steps of this manager (`unreadable` after `restore_latest`).

    Returns:
      One line per step saying where it went.

    Raises:
      ValueError: a folder could not be renamed (the message says what to
        do); those before it are renamed.
    """
    lines = []
    for step in steps:
      source = epath.Path(self.directory) / str(step)
      target = source.with_name(f'{step}.unreadable')
      copies = 0
      while target.exists():
        copies += 1
        target = source.with_name(f'{step}.unreadable.{copies}')
      try:
        source.rename(target)
      except OSError as e:
        raise ValueError(
            f'Checkpoint {step} in {self.directory} is unreadable and could'
            f' not be moved aside ({type(e).__name__}: {e}); move or delete'
            f' {source}, then run again.'
        ) from None
      lines.append(
          f'Moved the unreadable checkpoint {step} aside, to {target}: this'
          ' run will save that step again.'
      )
    self.reload()
    return lines

  def reload(self) -> None:
    """Reads the steps on disk again (after `set_aside` in any process)."""
    self._manager.reload()

  def _warn_unreadable(self, log, step: int, error: Exception) -> None:
    log(
        f'WARNING: checkpoint {step} in {self.directory} is unreadable '
        f'({type(error).__name__}: {str(error).splitlines()[0][:200]}); '
        'trying the previous one.'
    )

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
