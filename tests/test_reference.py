"""The models are the published DeepMind architectures, number for number.

For every `<tag>_params.json` in $NFNETS_REFERENCE_DIR (default
../shared/fixtures) the model's parameter tree must equal the fixture's
exactly, and its eval-mode logits must match `<tag>_reference.npz`.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import models
import reference_utils

TAGS = reference_utils.fixture_tags()


def test_reference_folder_holds_fixtures():
  assert TAGS, (
      f'No *_params.json in {reference_utils.reference_dir()}; '
      'set NFNETS_REFERENCE_DIR to the fixtures folder.'
  )


def _shapes(tree):
  return {
      m: {p: tuple(np.shape(v)) for p, v in d.items()} for m, d in tree.items()
  }


@pytest.mark.parametrize('tag', TAGS)
def test_matches_reference(tag):
  spec, params, reference = reference_utils.load_fixture(tag)
  name = models.name_for(spec['model'], spec['variant'])
  forward = hk.transform_with_state(
      lambda x, is_training: models.create(name)(
          x, is_training=is_training, return_metrics=True
      )
  )
  x = jnp.asarray(reference['input'])
  ours, state = jax.eval_shape(
      lambda r, x: forward.init(r, x, is_training=True),
      jax.random.PRNGKey(0),
      x,
  )
  assert _shapes(ours) == _shapes(params)
  assert models.count_params(name) == spec['num_params']

  apply = jax.jit(
      lambda p, x: forward.apply(p, {}, None, x, is_training=False)[0]
  )
  logits, metrics = apply(params, x)
  np.testing.assert_allclose(
      np.asarray(logits), reference['logits'], rtol=0, atol=1e-4
  )
  np.testing.assert_allclose(
      np.asarray(metrics['pool']), reference['pool'], rtol=1e-4, atol=1e-4
  )
  for key, value in spec.get('signal_metrics', {}).items():
    np.testing.assert_allclose(
        float(metrics[key]), value, rtol=1e-3, atol=1e-5, err_msg=key
    )
