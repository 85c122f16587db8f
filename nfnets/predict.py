"""Classifies image files with a trained model: published weights or a run.

    python -m nfnets.predict --checkpoint=F0 cat.jpg dog.png
    python -m nfnets.predict --checkpoint=F0_haiku.npz cat.jpg dog.png
    python -m nfnets.predict --checkpoint=workdir/f0 --json photos/*.jpg

`--checkpoint` is either a published DeepMind parameter file (`F0_haiku.npz`
... `F6_haiku.npz`: the model is read from the name, or given by `--model`;
`F0` ... `F6` download it once, into `checkpoint.cache_dir()`)
or a run of this project (its workdir, `checkpoints/` folder or one
`checkpoints/<step>` folder), whose `config.json` gives the model and the
eval image size and crop. A run's EMA weights are used where
it evaluated them (`eval.ema`), its trained weights otherwise (`--weights`
picks); only those are read, not the optimizer state. A run's class names
are those it trained with (its `classes.json`).

Each image is prepared as the evaluation prepares its images (decoded,
resized and centre-cropped to the eval size, normalised) and classified in
float32. One line per image gives its `--top` classes, most probable first:
index, name (ImageNet's are WordNet ids, e.g. n02123045 for tabby cat) and
probability; `--json` prints one JSON object per image instead.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import checkpoint
from nfnets import cli
from nfnets import data
from nfnets import models
from nfnets import train
from nfnets.data import device_augment

_PROG = 'python -m nfnets.predict'
# The published files' names: F0_haiku.npz ... F6_haiku.npz.
_PUBLISHED_NAME = re.compile(r'^F(\d)_haiku\.npz$', re.IGNORECASE)
WEIGHTS = ('auto', 'ema', 'raw')
_ONE_SET = (
    '--weights={weights} applies to a run; a parameter file holds one set of'
    ' weights.'
)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A model and its weights, with how its images are prepared.

  Attributes:
    model: the registry name, e.g. 'nfnet_f0'.
    overrides: constructor overrides the weights were trained with.
    params: Haiku params, float32, HWIO kernels.
    model_state: Haiku state (BatchNorm statistics; empty for NF models).
    image_size: side of the square images it is given.
    eval_resize: the eval crop, 'resize_crop' or 'crop_resize'.
    class_names: one per output, by label.
    source: what was loaded, for the reader.
    note: what the reader should know of the class names ('' if nothing).
  """

  model: str
  overrides: dict[str, Any]
  params: Any
  model_state: Any
  image_size: int
  eval_resize: str
  class_names: tuple[str, ...]
  source: str
  note: str = ''

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _num_classes(model: str, params, overrides, where: str) -> int:
  """The classifier's outputs, read from the weights' head."""
  one, two = (
      checkpoint.expected_param_shapes(model, n, **overrides) for n in (1, 2)
  )
  for module, names in one.items():
    for name, shape in names.items():
      if two[module][name] != shape and len(shape) == 2:
        if module in params and name in params[module]:
          return int(np.shape(params[module][name])[-1])
        raise ValueError(
            f'{where} has no {module}/{name}, the classifier of {model}.'
        )
  raise ValueError(f'{model} has no classifier weights to read.')


def _dataset_names(data_cfg: dict) -> tuple[str, ...]:
  """The dataset's class names as they are now; () if it cannot say."""
  tries = [data_cfg]
  if data_cfg.get('data_dir'):
    # TFDS knows a catalogued dataset's names without its data (a bucket
    # this machine cannot read, say).
    tries.append({**data_cfg, 'data_dir': None})
  for cfg in tries:
    try:
      return tuple(data.class_names(ml_collections.ConfigDict(cfg)))
    except Exception:  # pylint: disable=broad-except
      continue
  return ()


def _names(
    workdir: Optional[str], data_cfg: dict, num_classes: int
) -> tuple[tuple[str, ...], str]:
  """`(names, note)`: the run's names, else the dataset's, else numbers."""
  note = ''
  if workdir is not None:
    path = epath.Path(workdir) / train.CLASS_NAMES_FILE
    names = train.read_class_names(workdir)
    if names is not None and len(names) == num_classes:
      return tuple(names), ''
    if names is not None:
      note = f'{path} has {len(names)} names for {num_classes} classes; '
    elif path.exists():
      note = f'{path} is not a JSON list of names; '
    else:
      note = f'{path} is missing (a run from before it was written); '
  names = _dataset_names(data_cfg)
  if len(names) == num_classes:
    if note:
      note += (
          f'class names read from data.name={data_cfg["name"]} as it is now.'
      )
    return names, note
  return tuple(str(label) for label in range(num_classes)), (
      f'{note}class names unknown (data.name={data_cfg["name"]} cannot be'
      ' read here): labels are given as numbers.'
  )


def _from_file(path: str, model: Optional[str]) -> Classifier:
  """A published DeepMind parameter file."""
  if model is None:
    match = _PUBLISHED_NAME.match(os.path.basename(path))
    if match is None:
      raise ValueError(
          f'--checkpoint={path}: the model cannot be told from the file'
          ' name (F0_haiku.npz ... F6_haiku.npz); give --model, e.g.'
          ' --model=nfnet_f0.'
      )
    model = f'nfnet_f{match.group(1)}'
  info = models.info(model)
  # Before the file is read (F6's: 1.75 GB).
  if jax.tree_util.tree_leaves(initial_state(model, 2)):
    raise ValueError(
        f'--model={model} keeps BatchNorm statistics, which a parameter'
        ' file does not hold; give a run of this project instead.'
    )
  # Read once, then checked as load_deepmind_params does, for the classes
  # its classifier has.
  params = checkpoint.read_params_file(path)
  num_classes = _num_classes(model, params, {}, path)
  params = checkpoint.checked_params(
      params,
      checkpoint.expected_param_shapes(model, num_classes),
      where=f'{path} as {model}',
  )
  # ImageNet's, as the published weights were trained on it.
  names, note = _names(
      None, dict(name='imagenet2012', data_dir=None), num_classes
  )
  return Classifier(
      model=model,
      overrides={},
      params=params,
      model_state={},
      image_size=info.test_imsize,
      eval_resize='resize_crop',
      class_names=names,
      source=f'{path} as {model}',
      note=note,
  )


def initial_state(model: str, num_classes: int, **overrides) -> Any:
  """The shapes of a model's Haiku state (BatchNorm statistics; {} if none).

  Traced, not computed: nothing is allocated.
  """
  # In training mode: there BatchNorm creates its moving averages, which in
  # eval mode it can only read.
  forward = hk.transform_with_state(
      lambda x: models.create(model, num_classes, **overrides)(
          x, is_training=True
      )
  )
  _, state = jax.eval_shape(
      forward.init, jax.random.PRNGKey(0), jnp.zeros([1, 32, 32, 3])
  )
  return state


def read_run_config(workdir: str, data_keys: Sequence[str] = ()) -> dict:
  """The run's `config.json`, which names its model and data.

  Args:
    workdir: the run's workdir.
    data_keys: the `data` fields the caller needs, checked here.

  Raises:
    FileNotFoundError: it is missing, unreadable or lacks the model or one
      of `data_keys` (one line naming the file).
  """
  config_path = epath.Path(workdir) / 'config.json'
  try:
    config = json.loads(config_path.read_text())
    # Read here, so that a config.json without them fails in one place.
    str(config['model']['name'])
    for key in data_keys:
      str(config['data'][key])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FileNotFoundError(
        f"--checkpoint={workdir}: cannot read the run's config.json"
        f' ({type(e).__name__}: {e}); it names the model and data.'
    ) from None
  return config


@dataclasses.dataclass(frozen=True)
class RunWeights:
  """One set of weights of a run's checkpoint, checked against its model.

  Attributes:
    model: the registry name the run trained.
    overrides: the constructor overrides it trained with.
    params: Haiku params, float32, HWIO kernels.
    model_state: Haiku state (BatchNorm statistics; empty for NF models).
    num_classes: the classifier's outputs.
    step: the checkpoint's step.
    ema: whether these are the EMA weights (else the trained ones).
    where: the checkpoint, for the reader ('checkpoint 12 in DIR').
  """

  model: str
  overrides: dict[str, Any]
  params: Any
  model_state: Any
  num_classes: int
  step: int
  ema: bool
  where: str


def read_run_weights(
    workdir: str,
    step: Optional[int] = None,
    weights: str = 'auto',
    config: Optional[dict[str, Any]] = None,
) -> RunWeights:
  """The weights of a run's newest readable checkpoint, or of `step`'s.

  Only those weights and the model state are read, not the optimizer state.

  Args:
    workdir: the run's workdir.
    step: a checkpoint's step; None for the newest readable one.
    weights: 'auto' (the EMA weights if the run evaluated them, `eval.ema`,
      else the trained ones), 'ema' or 'raw'.
    config: the run's config.json, if already read (`read_run_config`).

  Raises:
    FileNotFoundError: no readable checkpoint or config.json.
    ValueError: no EMA weights where 'ema' asks for them, or weights that do
      not fit the run's model.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r} must be one of {WEIGHTS}.')
  if config is None:
    config = read_run_config(workdir)
  name = config['model']['name']
  overrides = dict(config['model'].get('overrides') or {})
  if weights == 'auto':
    # The weights whose accuracy the run reported (its EMA's with eval.ema).
    weights = 'ema' if (config.get('eval') or {}).get('ema') else 'raw'
  fields = ['params', 'model_state'] + (
      ['ema_params'] if weights == 'ema' else []
  )
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  try:
    saved, restored = checkpointer.restore_latest(
        None, step=step, fields=fields
    )
  finally:
    checkpointer.close()
  if saved is None:
    raise FileNotFoundError(
        f'--checkpoint={workdir}: no readable checkpoint in'
        f' {checkpointer.directory}.'
    )
  where = f'checkpoint {restored} in {checkpointer.directory}'
  if weights == 'ema' and not saved.get('ema_params'):
    raise ValueError(
        f'--weights=ema: {where} holds no EMA weights (the run had no'
        ' optimizer.ema_decay); use --weights=raw.'
    )
  params = saved['ema_params'] if weights == 'ema' else saved['params']
  num_classes = _num_classes(name, params, overrides, where)
  checkpoint.check_params(
      params,
      checkpoint.expected_param_shapes(name, num_classes, **overrides),
      where=where,
  )
  return RunWeights(
      model=name,
      overrides=overrides,
      params=params,
      model_state=saved.get('model_state') or {},
      num_classes=num_classes,
      step=int(restored),
      ema=weights == 'ema',
      where=where,
  )


def _from_run(
    workdir: str, step: Optional[int], model: Optional[str], weights: str
) -> Classifier:
  """A run of this project, as its config.json describes it."""
  config = read_run_config(workdir, ('eval_image_size', 'eval_resize'))
  name = config['model']['name']
  data_cfg = config['data']
  if data_cfg.get('name') == 'digits':
    raise ValueError(
        f'--checkpoint={workdir} was trained on the embedded 8x8 digits,'
        ' which are arrays, not image files: its evaluation'
        ' (--mode=eval) is the way to test it.'
    )
  if model is not None and model != name:
    raise ValueError(
        f'--model={model}, but the run at {workdir} trained {name}; leave'
        ' --model out for a run.'
    )
  run = read_run_weights(workdir, step, weights, config)
  names, note = _names(workdir, data_cfg, run.num_classes)
  which = 'EMA' if run.ema else 'trained'
  return Classifier(
      model=name,
      overrides=run.overrides,
      params=run.params,
      model_state=run.model_state,
      image_size=int(data_cfg['eval_image_size']),
      eval_resize=data_cfg['eval_resize'],
      class_names=names,
      source=f'{run.where}: {name}, {which} weights',
      note=note,
  )


def load(
    path: str, model: Optional[str] = None, weights: str = 'auto'
) -> Classifier:
  """The classifier of a published parameter file or of a run's checkpoint.

  Args:
    path: a parameter file (`F0_haiku.npz`; 'F0' to download it), or a
      run's workdir, `checkpoints/` or `checkpoints/<step>` folder.
    model: the registry name; needed for a file whose name does not say it.
    weights: for a run: 'auto' (its EMA weights if it evaluated them,
      `eval.ema`, else its trained ones), 'ema' or 'raw'.

  Raises:
    FileNotFoundError: nothing at `path`, or a run with no readable
      checkpoint or config.json.
    ValueError: an unknown model, or weights of another model.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r} must be one of {WEIGHTS}.')
  if model is not None:
    models.info(model)  # An unknown name fails here, with close matches.
  path = train.expand_home(path)
  if weights != 'auto' and checkpoint.names_published(path):
    raise ValueError(_ONE_SET.format(weights=weights))
  # 'F0' ... 'F6': the published weights, downloaded on first use.
  path = checkpoint.published_file(path)
  run = train.run_checkpoint(path, '--checkpoint')
  if run is not None:
    return _from_run(run[0], run[1], model, weights)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'--checkpoint={path}: no such file or folder.')
  if weights != 'auto':
    raise ValueError(_ONE_SET.format(weights=weights))
  return _from_file(path, model)


def check_image_path(path: str) -> None:
  """Raises FileNotFoundError unless `path` (`~` expanded) is a file."""
  found = epath.Path(train.expand_home(path))
  if found.is_dir():
    raise FileNotFoundError(f'{path} is a folder, not an image file.')
  if not found.is_file():
    raise FileNotFoundError(f'{path}: no such image file.')


def read_image(path: str, image_size: int, eval_resize: str) -> np.ndarray:
  """An image file prepared as the evaluation does: uint8 `[S, S, 3]`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not an image TensorFlow decodes.
  """
  # Imported here: TensorFlow is slow to import, and only this needs it.
  from nfnets.data import augment  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  check_image_path(path)
  encoded = epath.Path(train.expand_home(path)).read_bytes()
  try:
    image = augment.eval_image(tf.constant(encoded), image_size, eval_resize)
  except tf.errors.InvalidArgumentError:
    raise ValueError(
        f'{path} is not a JPEG, PNG, GIF or BMP image TensorFlow can decode.'
    ) from None
  return image.numpy()


def classify(
    classifier: Classifier,
    paths: Sequence[str],
    top: int = 5,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
  """The `top` classes of each image, most probable first.

  Args:
    classifier: from `load`.
    paths: image files.
    top: classes per image (at most the model's).
    batch_size: images per forward pass.

  Returns:
    One dict per image: `image` (its path) and `top`, a list of `label`,
    `name` and `probability`.
  """
  if top < 1 or batch_size < 1:
    raise ValueError(f'top={top} and batch_size={batch_size} must be >= 1.')
  top = min(top, classifier.num_classes)
  forward = hk.transform_with_state(
      lambda x: models.create(
          classifier.model, classifier.num_classes, **classifier.overrides
      )(x, is_training=False)
  )

  # The weights are arguments: closed over, XLA would fold them into the
  # program as constants (F0: 5x the compile time, 1 GB more memory).
  @jax.jit
  def probabilities(params, model_state, images):
    logits, _ = forward.apply(
        params,
        model_state,
        None,
        device_augment.normalize(images),  # as the evaluation's
    )
    return jax.nn.softmax(logits.astype(jnp.float32))

  # No larger than the images: one image is one image's work.
  batch_size = min(batch_size, len(paths))
  results = []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start : start + batch_size]
    images = np.stack(
        [
            read_image(p, classifier.image_size, classifier.eval_resize)
            for p in chunk
        ]
    )
    # The last chunk padded to a full batch: one compiled shape for all.
    padded = np.zeros((batch_size,) + images.shape[1:], images.dtype)
    padded[: len(chunk)] = images
    probs = np.asarray(
        probabilities(classifier.params, classifier.model_state, padded)
    )[: len(chunk)]
    for path, p in zip(chunk, probs):
      best = np.argsort(-p, kind='stable')[:top]
      results.append(
          dict(
              image=path,
              top=[
                  dict(
                      label=int(label),
                      name=classifier.class_names[label],
                      probability=float(p[label]),
                  )
                  for label in best
              ],
          )
      )
  return results


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=_PROG, description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
  parser.add_argument(
      '--checkpoint',
      required=True,
      help=(
          'a published parameter file (F0_haiku.npz; F0 ... F6 download'
          " it once) or a run's workdir"
      ),
  )
  parser.add_argument(
      '--model', help='registry name, for a file whose name does not say it'
  )
  parser.add_argument(
      '--weights',
      choices=WEIGHTS,
      default='auto',
      help=(
          "a run's weights: auto (its EMA weights if it evaluated them,"
          ' else its trained ones), ema or raw'
      ),
  )
  parser.add_argument('--top', type=_positive_int, default=5)
  parser.add_argument('--batch_size', type=_positive_int, default=16)
  parser.add_argument(
      '--json', action='store_true', help='one JSON object per image'
  )
  return parser


def _line(result: dict[str, Any]) -> str:
  classes = ', '.join(
      f'{c["label"]} {c["name"]} {100 * c["probability"]:.1f}%'
      for c in result['top']
  )
  return f'{result["image"]}: {classes}'


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Classifies the images; prints one line (or JSON object) per image."""
  args = build_parser().parse_args(argv)
  try:
    # Checked first: loading F6's weights takes a while.
    for path in args.images:
      check_image_path(path)
    classifier = load(args.checkpoint, args.model, args.weights)
    print(
        f'{classifier.source}; {classifier.image_size} px images.',
        file=sys.stderr,
    )
    if classifier.note:
      print(f'Note: {classifier.note}', file=sys.stderr)
    for result in classify(classifier, args.images, args.top, args.batch_size):
      print(json.dumps(result) if args.json else _line(result), flush=True)
  except KeyboardInterrupt:
    cli.exit_interrupted(f'{_PROG}: interrupted.')
  except (ValueError, OSError) as e:
    # OSError: a file that cannot be read (permissions, a failing disk).
    sys.exit(f'{_PROG}: error: {e}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
