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
