"""RandAugment constants shared by the host (TF) and device (JAX) versions.

`nfnets.data.randaugment` (tf.data, on the CPU) and
`nfnets.data.device_augment` (JAX, on the accelerator) implement the same
operations and draw from the same distribution; these are the numbers that
make it the same. Kept apart from both because one imports TensorFlow and
the other must not.
"""

# Magnitude at which each operation reaches its standard maximum.
MAX_LEVEL = 10.0
# Grey used where geometric operations and Cutout leave no image.
FILL_VALUE = 128
# The probability that a layer applies the operation it drew: always. The
# release's code draws a probability in [0.2, 0.8] for each operation but
# never uses it (none of its image operations takes one), so each of the N
# layers applies one operation.
APPLY_PROBABILITY = 1.0
# The 16 operations of the AutoAugment/RandAugment code the NFNets release
# used, in its order (a layer draws an index into this tuple).
RANDAUGMENT_OPS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'Posterize',
    'Solarize',
    'Color',
    'Contrast',
    'Brightness',
    'Sharpness',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Cutout',
    'SolarizeAdd',
)


# The release's magnitude -> argument mapping of the operations whose
# argument is one number for every image (`level = M / MAX_LEVEL`); the host
# and device versions both call these.
def enhance_factor(magnitude: float) -> float:
  """Color, Contrast, Brightness, Sharpness: 0.1 + 1.8 * level, no sign.

  1 at M = 5, 2.8 at M = 15; never 0, which would make an image black
  (Brightness) or one grey (Contrast).
  """
  return 0.1 + 1.8 * magnitude / MAX_LEVEL


def posterize_bits(magnitude: float) -> int:
  """Bits Posterize keeps: int(4 * level) (2 at M = 5, 6 at M = 15)."""
  return min(max(int(4 * magnitude / MAX_LEVEL), 0), 8)


def solarize_threshold(magnitude: float) -> int:
  """Solarize inverts pixels >= int(256 * level): none from M = 10 on."""
  return min(max(int(256 * magnitude / MAX_LEVEL), 0), 256)


def solarize_addition(magnitude: float) -> int:
  """SolarizeAdd adds int(110 * level) to the pixels below 128."""
  return min(max(int(110 * magnitude / MAX_LEVEL), 0), 255)
