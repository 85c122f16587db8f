"""The model registry: every network by name, with parameter and FLOP counts.

    model = nfnets.models.create('nfnet_f0')      # inside hk.transform
    logits = model(images, is_training=False)

`create` returns a new Haiku module, so it must be called inside a Haiku
transform. Use `hk.transform_with_state` for the BatchNorm baselines (the
others have no state, and work with either).
"""

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import baselines
from nfnets import layers
from nfnets import nf_regnet
from nfnets import nf_resnet
from nfnets import nfnet


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the registry knows about one name.

  Attributes:
    name: registry name, e.g. 'nfnet_f0'.
    family: 'nfnet', 'nf_resnet', 'nf_regnet', 'resnet_bn',
      'resnet_unnormalized', 'resnet_skipinit' or 'resnet_fixup'.
    variant: the family's variant key, e.g. 'F0', 'ResNet50', 'B0'.
    constructor: the Haiku module class.
    kwargs: constructor arguments that define this name.
    train_imsize: training resolution of the paper's recipe.
    test_imsize: evaluation resolution of the paper's recipe.
    drop_rate: the variant's dropout before the classifier.
  """

  name: str
  family: str
  variant: str
  constructor: Callable[..., hk.Module]
  kwargs: dict[str, Any]
  train_imsize: int
  test_imsize: int
  drop_rate: float


def _build_registry() -> dict[str, ModelInfo]:
  registry = {}

  def add(name, family, variant, constructor, spec, **kwargs):
    registry[name] = ModelInfo(
        name,
        family,
        variant,
        constructor,
        dict(variant=variant, **kwargs),
        spec.get('train_imsize', 224),
        spec.get('test_imsize', 224),
        spec.get('drop_rate', 0.0),
    )

  for variant, spec in nfnet.VARIANTS.items():
    name = 'nfnet_' + variant.lower().replace('+', '_plus')
    add(name, 'nfnet', variant, nfnet.NFNet, spec)
  for variant, spec in nf_resnet.VARIANTS.items():
    add('nf_' + variant.lower(), 'nf_resnet', variant, nf_resnet.NFResNet, spec)
  for variant, spec in nf_regnet.VARIANTS.items():
    add(
        'nf_regnet_' + variant.lower(),
        'nf_regnet',
        variant,
        nf_regnet.NFRegNet,
        spec,
    )
  for variant, spec in baselines.VARIANTS.items():
    base = variant.lower()
    add(
        base + '_bn',
        'resnet_bn',
        variant,
        baselines.ResNet,
        spec,
        norm='batchnorm',
    )
    add(
        base + '_unnormalized',
        'resnet_unnormalized',
        variant,
        baselines.ResNet,
        spec,
        norm=None,
    )
    add(
        base + '_skipinit',
        'resnet_skipinit',
        variant,
        baselines.ResNet,
        spec,
        norm=None,
        skipinit='zeros',
    )
    add(base + '_fixup', 'resnet_fixup', variant, baselines.FixupResNet, spec)
  return registry


_REGISTRY = _build_registry()

_BY_FAMILY_VARIANT = {(e.family, e.variant): e.name for e in _REGISTRY.values()}


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
  """The registry entry of `name`; a ValueError lists valid names if unknown."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f' Did you mean {close}?' if close else ''
    raise ValueError(
        f'Unknown model name {name!r}.{hint} Valid names: {names()}.'
    )
  return _REGISTRY[name]


def families() -> list[str]:
  """The model families, e.g. 'nfnet', 'nf_resnet', 'resnet_bn'."""
  return sorted({family for family, _ in _BY_FAMILY_VARIANT})


def name_for(family: str, variant: str) -> str:
  """Registry name of (family, variant), e.g. ('nfnet', 'F3+') -> 'nfnet_f3_plus'.

  Family and variant keys are those of the release's code and of the
  reference fixtures ('nfnet'/'F0', 'nf_resnet'/'ResNet50', 'nf_regnet'/'B0').
  """
  if family not in families():
    raise ValueError(f'Unknown model family {family!r}; valid: {families()}.')
  if (family, variant) not in _BY_FAMILY_VARIANT:
    valid = sorted(v for f, v in _BY_FAMILY_VARIANT if f == family)
    raise ValueError(f'Unknown {family} variant {variant!r}; valid: {valid}.')
  return _BY_FAMILY_VARIANT[(family, variant)]


def create(name: str, num_classes: int = 1000, **overrides) -> hk.Module:
  """Returns a new module of model `name`; call it inside a Haiku transform.

  Args:
    name: one of `names()`.
    num_classes: classifier outputs.
    **overrides: constructor arguments of the model's class (e.g. `width`,
      `drop_rate`, `stochdepth_rate`, `activation`, `depth`).

  Returns:
    A Haiku module `model(x, *, is_training, return_metrics=False)`.
  """
  entry = info(name)
  accepted = set(inspect.signature(entry.constructor).parameters)
  unknown = sorted(set(overrides) - accepted)
  if unknown:
    raise ValueError(
        f'Model {name!r} does not take {unknown}; it takes '
        f'{sorted(accepted - {"name"})}.'
    )
  if 'variant' in overrides:
    raise ValueError(
        f'Pick the variant by name, not override: got '
        f'variant={overrides["variant"]!r} for {name!r}.'
    )
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes}.')
  return entry.constructor(
      num_classes=num_classes, **{**entry.kwargs, **overrides}
  )


def _forward_fn(name, num_classes, overrides):
  def forward(x, is_training):
    return create(name, num_classes, **overrides)(x, is_training=is_training)

  return forward


def _init_shapes(forward, x):
  # Initialize in training mode: BatchNorm creates its moving averages there.
  return jax.eval_shape(
      lambda rng, x: forward.init(rng, x, is_training=True),
      jax.random.PRNGKey(0),
      x,
  )


def _count(
    name: str, image_size: int, num_classes: int, overrides
) -> tuple[int, int]:
  """`(parameters, multiply-adds per image)` of a model, from one trace.

  The network is traced, not run, once, by its initialisation at this image
  size; convolutions and dense layers are counted as they are called.
  """
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  counts = []

  def interceptor(next_f, args, kwargs, context):
    out = next_f(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    module = context.module
    if isinstance(module, layers.WSConv2D):
      in_ch = args[0].shape[-1] // module.feature_group_count
      per_output = in_ch * np.prod(module.kernel_shape)
      counts.append(np.prod(out.shape[1:]) * per_output)
    elif isinstance(module, layers.Linear):
      counts.append(args[0].shape[-1] * module.output_size)
    return out

  forward_fn = _forward_fn(name, num_classes, overrides)

  def counted(x, is_training):
    with hk.intercept_methods(interceptor):
      return forward_fn(x, is_training)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  # Training mode calls the same convolutions and dense layers as eval mode
  # (stochastic depth and dropout only scale their outputs).
  params, _ = _init_shapes(hk.transform_with_state(counted), x)
  num_params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
  return int(num_params), int(sum(counts))


def count_params(name: str, num_classes: int = 1000, **overrides) -> int:
  """Number of trainable parameters (no arrays are allocated)."""
  return _count(name, 32, num_classes, overrides)[0]


def count_flops(
    name: str,
    image_size: Optional[int] = None,
    num_classes: int = 1000,
    **overrides,
) -> int:
  """Multiply-adds of one image's forward pass, counted as in the papers.

  Counts the convolutions and dense layers (Squeeze-Excite and classifier
  included), from the shapes the network actually produces at this input
  size; activations, pooling and normalization are not counted.

  Args:
    name: registry name.
    image_size: square input side; the model's test resolution by default.
    num_classes: classifier outputs.
    **overrides: constructor overrides, as for `create`.

  Returns:
    The multiply-add count per image.
  """
  size = image_size or info(name).test_imsize
  return _count(name, size, num_classes, overrides)[1]


def summary(
    name: str, image_size: Optional[int] = None, **overrides
) -> dict[str, Any]:
  """Parameters (M) and FLOPs (B multiply-adds) of a model, for tables."""
  entry = info(name)
  size = image_size or entry.test_imsize
  num_params, flops = _count(name, size, 1000, overrides)
  return dict(
      name=name,
      family=entry.family,
      variant=entry.variant,
      image_size=size,
      params_m=num_params / 1e6,
      flops_b=flops / 1e9,
  )
