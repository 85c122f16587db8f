"""Loading the published DeepMind parameter files safely."""

import asyncio
import functools
import http.server
import io
import logging
import os
import pathlib
import pickle
import threading
import time
import tracemalloc
import urllib.request

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import checkpoint
from nfnets import models


@functools.lru_cache(maxsize=1)
def _init_tiny():
  f = hk.transform_with_state(
      lambda x: models.create('nfnet_tiny')(x, is_training=True)
  )
  params, _ = jax.jit(f.init)(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  return params


def _tiny_params():
  # Plain numpy in plain dicts: what the original files hold.
  return {
      m: {p: np.asarray(v) for p, v in d.items()}
      for m, d in _init_tiny().items()
  }


def test_round_trips_a_file_in_the_original_format(tmp_path):
  params = _tiny_params()
  path = tmp_path / 'tiny_haiku.npz'
  with open(path, 'wb') as f:
    pickle.dump(params, f)
  loaded = checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')
  assert loaded.keys() == params.keys()
  for module in params:
    for name, value in params[module].items():
      np.testing.assert_array_equal(loaded[module][name], value)


class _Exploit:

  def __reduce__(self):
    return (os.system, ('touch /tmp/nfnets_pwned',))


def test_refuses_a_pickle_that_would_call_a_function(tmp_path):
  path = tmp_path / 'evil.npz'
  with open(path, 'wb') as f:
    pickle.dump({'NFNet/~/linear': {'w': _Exploit()}}, f)
  if os.path.exists('/tmp/nfnets_pwned'):
    os.remove('/tmp/nfnets_pwned')
  with pytest.raises(checkpoint.UnsafePickleError, match='system'):
    checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')
  assert not os.path.exists('/tmp/nfnets_pwned')


def test_wrong_shape_names_the_path_and_both_shapes(tmp_path):
  params = _tiny_params()
  params['NFNet/~/linear']['w'] = np.zeros((3, 3), np.float32)
  path = tmp_path / 'bad.npz'
  with open(path, 'wb') as f:
    pickle.dump(params, f)
  with pytest.raises(
      ValueError, match=r'NFNet/~/linear/w.*\(3, 3\).*' r'\(256, 1000\)'
  ):
    checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')


def test_missing_and_extra_parameters_are_named(tmp_path):
  params = _tiny_params()
  del params['NFNet/~/final_conv']['gain']
  path = tmp_path / 'missing.npz'
  with open(path, 'wb') as f:
    pickle.dump(params, f)
  with pytest.raises(ValueError, match='missing parameter NFNet/~/final_conv'):
    checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')
  params = _tiny_params()
  params['NFNet/~/extra'] = {'w': np.zeros(2, np.float32)}
  with open(path, 'wb') as f:
    pickle.dump(params, f)
  with pytest.raises(ValueError, match='unexpected parameter NFNet/~/extra/w'):
    checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')


def test_wrong_variant_is_an_error(tmp_path):
  path = tmp_path / 'tiny.npz'
  with open(path, 'wb') as f:
    pickle.dump(_tiny_params(), f)
  with pytest.raises(ValueError, match='nfnet_f0'):
    checkpoint.load_deepmind_params(str(path), 'nfnet_f0')


def test_truncated_file_is_a_clear_error(tmp_path):
  path = tmp_path / 'cut.npz'
  with open(path, 'wb') as f:
    f.write(pickle.dumps(_tiny_params())[:1000])
  with pytest.raises(ValueError, match='corrupt or truncated'):
    checkpoint.load_deepmind_params(str(path), 'nfnet_tiny')


def test_train_checkpointer_accepts_a_relative_workdir(tmp_path, monkeypatch):
  # experiment.py passes --workdir as typed; orbax itself wants absolute paths.
  monkeypatch.chdir(tmp_path)
  checkpointer = checkpoint.TrainCheckpointer('relative/run', keep=2)
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpointer.save(3, tree, wait=True)
  restored, step = checkpointer.restore_latest(tree)
  checkpointer.close()
  assert step == 3
  np.testing.assert_array_equal(restored['w'], tree['w'])
  assert (tmp_path / 'relative' / 'run' / 'checkpoints' / '3').is_dir()


class _RaisesWhenCollected:
  """Its `__del__` raises into `sys.unraisablehook`, as a late callback does."""

  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_closed_loop_echoes_of_a_failed_restore_are_silenced(
    tmp_path, monkeypatch
):
  # The echoes can arrive while the failing restore is still running, so the
  # filter must already be in place then; other unraisables still get out.
  seen = []
  monkeypatch.setattr('sys.unraisablehook', seen.append)
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path), keep=2)
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpointer.save(1, tree, wait=True)
  checkpointer.save(2, tree, wait=True)
  real_restore = checkpointer._manager.restore

  def restore(step, **kwargs):
    if step == 2:
      _RaisesWhenCollected(RuntimeError('Event loop is closed'))
      _RaisesWhenCollected(ValueError('something else'))
      raise OSError('truncated read')
    return real_restore(step, **kwargs)

  monkeypatch.setattr(checkpointer._manager, 'restore', restore)
  warnings = []
  restored, step = checkpointer.restore_latest(tree, log=warnings.append)
  checkpointer.close()
  assert step == 1
  np.testing.assert_array_equal(restored['w'], tree['w'])
  assert len(warnings) == 1 and 'checkpoint 2' in warnings[0]
  assert [type(u.exc_value) for u in seen] == [ValueError]


def test_never_retrieved_reads_of_a_failed_restore_are_not_logged(
    tmp_path, monkeypatch, caplog
):
  # A truncated checkpoint fails several reads; asyncio reports each one the
  # restore did not raise, whenever its task is collected. Those naming the
  # checkpoint go; a report of anything else still reaches the log.
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path), keep=2)
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpointer.save(1, tree, wait=True)
  checkpointer.save(2, tree, wait=True)
  real_restore = checkpointer._manager.restore
  loop = asyncio.new_event_loop()

  def report(error):
    loop.call_exception_handler(
        {'message': 'Task exception was never retrieved', 'exception': error}
    )

  def restore(step, **kwargs):
    if step == 2:
      report(
          ValueError(
              f'OUT_OF_RANGE: Error reading "w" at local file'
              f' "{checkpointer.directory}/2/default/"'
          )
      )
      raise ValueError('OUT_OF_RANGE: the first read')
    return real_restore(step, **kwargs)

  monkeypatch.setattr(checkpointer._manager, 'restore', restore)
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    restored, step = checkpointer.restore_latest(tree, log=lambda _: None)
    report(
        ValueError(
            f'Error reading "w" at local file'
            f' "{checkpointer.directory}/1/default/"'
        )
    )  # late
    report(ValueError('Error reading "w" at local file "/elsewhere/"'))
  loop.close()
  checkpointer.close()
  assert step == 1
  reported = [r.exc_info[1] for r in caplog.records if r.name == 'asyncio']
  assert [str(e) for e in reported] == [
      'Error reading "w" at local file "/elsewhere/"'
  ]


def test_set_aside_keeps_the_files_under_a_name_orbax_skips(tmp_path):
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path), keep=2)
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  for step in (1, 2):
    checkpointer.save(step, tree, wait=True)
  folder = tmp_path / 'checkpoints'
  (folder / '2.unreadable').mkdir()  # set aside by an earlier run
  lines = checkpointer.set_aside([2])
  assert lines == [
      f'Moved the unreadable checkpoint 2 aside, to {folder}/2.unreadable.1:'
      ' this run will save that step again.'
  ]
  assert checkpointer.all_steps() == [1]
  assert (folder / '2.unreadable.1' / 'default').is_dir()
  # Saved again, step 2 is a checkpoint again; keep=2 deletes neither copy.
  checkpointer.save(2, tree, wait=True)
  checkpointer.save(3, tree, wait=True)
  assert checkpointer.all_steps() == [2, 3]
  assert (folder / '2.unreadable.1').is_dir() and (
      folder / '2.unreadable'
  ).is_dir()
  checkpointer.close()
  assert checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [2, 3]


def test_restore_latest_of_a_given_step_and_its_errors(tmp_path):
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path), keep=3)
  trees = {s: {'w': np.full((2, 3), s, np.float32)} for s in (1, 2)}
  for s, tree in trees.items():
    checkpointer.save(s, tree, wait=True)
  restored, step = checkpointer.restore_latest(trees[1], step=1)
  assert step == 1
  np.testing.assert_array_equal(restored['w'], trees[1]['w'])
  assert checkpointer.restore_latest(trees[1])[1] == 2  # the newest
  with pytest.raises(
      FileNotFoundError, match=r'No finished checkpoint 5 .*\[1, 2\]'
  ):
    checkpointer.restore_latest(trees[1], step=5)
  # An unreadable step asked for is an error, not a fall back to step 1.
  for path in (tmp_path / 'checkpoints' / '2').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  warnings = []
  with pytest.raises(ValueError, match='Checkpoint 2 .* is unreadable'):
    checkpointer.restore_latest(trees[1], log=warnings.append, step=2)
  assert not warnings
  assert checkpointer.restore_latest(trees[1], log=warnings.append)[1] == 1
  assert len(warnings) == 1
  checkpointer.close()


@pytest.mark.parametrize('with_target', [True, False])
def test_restoring_some_fields_reads_no_other_array(tmp_path, with_target):
  # Evaluation and fine-tuning want a run's parameters: its optimizer state
  # (here 32 MB) must not be read into memory alongside them.
  params = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  big = np.ones((2048, 4096), np.float32)
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  checkpointer.save(1, {'params': params, 'opt_state': {'m': big}}, wait=True)
  target = {'params': {'w': np.zeros((2, 3), np.float32)}}
  tracemalloc.start()
  try:
    restored, step = checkpointer.restore_latest(
        target if with_target else None, step=1, fields=['params']
    )
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  checkpointer.close()
  assert step == 1 and list(restored) == ['params']
  np.testing.assert_array_equal(restored['params']['w'], params['w'])
  assert peak < big.nbytes / 4, f'{peak / 2**20:.1f} MiB allocated'


class _Server:
  """A local HTTP server of `folder`, counting the requests it answers.

  `cut` names a file sent with a Content-Length it never delivers: a
  connection closed mid-transfer.
  """

  def __init__(self, folder, cut=None):
    requests = self.requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):

      def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(folder), **kwargs)

      def do_GET(self):  # pylint: disable=invalid-name
        requests.append(self.path)
        if cut and self.path.endswith(cut):
          self.send_response(200)
          self.send_header('Content-Length', '100000')
          self.end_headers()
          self.wfile.write(b'\x80\x04' + b'x' * 100)
          return
        super().do_GET()

      def log_message(self, *args):  # quiet
        pass

      def finish(self):
        try:
          super().finish()
        except OSError:  # The client hung up: it was meant to, in tests.
          pass

    class Server(http.server.ThreadingHTTPServer):

      def handle_error(self, request, client_address):
        pass  # As above.

    self.server = Server(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.server.server_port}'
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def test_published_names_download_once_into_the_cache(tmp_path, monkeypatch):
  served = tmp_path / 'bucket'
  served.mkdir()
  with open(served / 'F0_haiku.npz', 'wb') as f:
    pickle.dump(_tiny_params(), f)
  server = _Server(served, cut='F2_haiku.npz')
  monkeypatch.setattr(
      checkpoint, 'PUBLISHED_URL', server.url + '/{name}_haiku.npz'
  )
  monkeypatch.setenv('NFNETS_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.chdir(tmp_path)
  logs = []
  try:
    path = checkpoint.published_file('f0', log=logs.append)
    assert path == str(tmp_path / 'cache' / 'F0_haiku.npz')
    assert (served / 'F0_haiku.npz').read_bytes() == (
        pathlib.Path(path).read_bytes()
    )
    assert checkpoint.published_file('F0', log=logs.append) == path
    assert server.requests == ['/F0_haiku.npz'] and len(logs) == 1
    params = checkpoint.load_deepmind_params(path, 'nfnet_tiny')
    assert params.keys() == _tiny_params().keys()
    # Missing, or cut off mid-transfer: an error with the URL, no file.
    with pytest.raises(FileNotFoundError, match='F1_haiku.npz .*by hand'):
      checkpoint.published_file('F1', log=logs.append)
    with pytest.raises(FileNotFoundError, match='F2_haiku.npz .*by hand'):
      checkpoint.published_file('F2', log=logs.append)
    # A page of a proxy or portal, served whole in place of the file.
    (served / 'F4_haiku.npz').write_text('<html>Sign in</html>')
    with pytest.raises(FileNotFoundError, match='not a parameter file'):
      checkpoint.published_file('F4', log=logs.append)

    # Ctrl-C mid-transfer.
    class Interrupted(io.BytesIO):

      headers = {}

      def read(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        urllib.request, 'urlopen', lambda *a, **k: Interrupted()
    )
    with pytest.raises(KeyboardInterrupt):
      checkpoint.published_file('F5', log=logs.append)
    assert os.listdir(tmp_path / 'cache') == ['F0_haiku.npz']
  finally:
    server.close()
  # A file or folder of that name, and any other name, are paths.
  (tmp_path / 'F3').mkdir()
  assert checkpoint.published_file('F3') == 'F3'
  assert checkpoint.published_file('F7') == 'F7'
  assert checkpoint.published_file('runs/F0') == 'runs/F0'


def test_stale_partial_downloads_are_removed_and_live_ones_kept(
    tmp_path, monkeypatch
):
  monkeypatch.setenv('NFNETS_JAX_CACHE', str(tmp_path))
  monkeypatch.setattr(checkpoint, 'PUBLISHED_URL', 'http://127.0.0.1:9/{name}')
  stale = tmp_path / 'F0_haiku.npz.x1.part'
  live = tmp_path / 'F0_haiku.npz.x2.part'
  stale.write_bytes(b'killed'), live.write_bytes(b'downloading')
  two_hours_ago = time.time() - 7200
  os.utime(stale, (two_hours_ago, two_hours_ago))
  with pytest.raises(FileNotFoundError, match='Could not download'):
    checkpoint.published_file('F0', log=lambda _: None)
  assert sorted(os.listdir(tmp_path)) == [live.name]


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv('NFNETS_JAX_CACHE', str(tmp_path / 'file'))
  with pytest.raises(FileNotFoundError, match='set NFNETS_JAX_CACHE'):
    checkpoint.published_file('F0', log=lambda _: None)
