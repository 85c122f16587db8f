"""Regenerates the papers' tables and figures into `results/`.

    python -m nfnets.reproduce table3     # params/FLOPs vs Table 3
    python -m nfnets.reproduce spp        # signal propagation plots
    python -m nfnets.reproduce variance   # variance growth with depth
    python -m nfnets.reproduce latency [--shrink]  # train step ms vs Table 3
    python -m nfnets.reproduce agc        # batch size x AGC lambda
    python -m nfnets.reproduce depth      # training at 16 / 100 blocks

Measured on a shared 2-core CPU: table3 1.5 min, spp 1 min, variance 1 min,
latency --shrink 9 min, agc 7 min, depth 8 min.

Every subcommand takes `--results_dir` (default `results`), writes its
Markdown / CSV / PNG files there and prints each path it wrote, one per line,
on stdout (progress goes to stderr). Every number in the outputs is computed
here; the papers' numbers are quoted beside them, labelled as the paper's.
Run `python -m nfnets.reproduce <subcommand> --help` for each one's flags.
"""

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from nfnets import jsonl
from nfnets import models
from nfnets import nf_resnet
from nfnets import signal_prop
from nfnets import sweep

# Table 3 of the NFNets paper (Brock et al. 2021): FLOPs (B multiply-adds at
# test resolution), params (M), ImageNet top-1 / top-5 (%), and ms per
# training step at 32 images per device on TPUv3 (bf16) and V100 (fp16).
# Keys are our registry names; F6's row is the paper's "NFNet-F6+SAM", and
# ResNet-50 its comparator (None: not given there).
_PAPER_COLUMNS = (
    'label',
    'flops_b',
    'params_m',
    'top1',
    'top5',
    'tpuv3_ms',
    'v100_ms',
)
_PAPER_ROWS = {
    'nfnet_f0': ('NFNet-F0', 12.38, 71.5, 83.6, 96.8, 73.3, 56.7),
    'nfnet_f1': ('NFNet-F1', 35.54, 132.6, 84.7, 97.1, 158.5, 133.9),
    'nfnet_f2': ('NFNet-F2', 62.59, 193.8, 85.1, 97.3, 295.8, 226.3),
    'nfnet_f3': ('NFNet-F3', 114.76, 254.9, 85.7, 97.5, 532.2, 524.5),
    'nfnet_f4': ('NFNet-F4', 215.24, 316.1, 85.9, 97.6, 1033.3, 1190.6),
    'nfnet_f5': ('NFNet-F5', 289.76, 377.2, 86.0, 97.6, 1398.5, 2177.1),
    'nfnet_f6': ('NFNet-F6+SAM', 377.28, 438.4, 86.5, 97.9, 2774.1, None),
    'resnet50_bn': ('ResNet-50', 4.10, 26.0, 78.6, None, 41.6, 35.3),
}
# The paper's rows with no model here, quoted under our table: Table 3's
# other comparator, and Table 2's F0 with BatchNorm instead of NF.
_PAPER_OTHER_ROWS = (
    "EffNet-B7, the paper's other comparator (not implemented here): 37.0B"
    ' FLOPs, 66M parameters, 84.7% top-1, 1397.0 ms (TPUv3) and 1753.3 ms'
    ' (V100) per step. NFNet-F0 with BatchNorm instead of the NF scheme'
    ' (Table 2): 83.4% top-1 at 111.7 ms per TPUv3 step, against 83.6% at'
    ' 73.3 ms. The paper gives ResNet-50 26.0M parameters; a standard'
    " ResNet-50 has 25.6M (torchvision's: 25,557,032)."
)
PAPER_TABLE3: dict[str, dict[str, Any]] = {
    name: dict(zip(_PAPER_COLUMNS, row)) for name, row in _PAPER_ROWS.items()
}

# The rows of our Table 3: every NFNet, NF-ResNet and NF-RegNet variant, and
# the paper's ResNet-50 comparator (our BN baseline).
TABLE3_MODELS = (
    [f'nfnet_f{i}' for i in range(8)]
    + [f'nfnet_f{i}_plus' for i in range(8)]
    + [f'nf_resnet{d}' for d in (26, 50, 101, 152, 200)]
    + [f'nf_regnet_b{i}' for i in range(9)]
    + ['resnet50_bn']
)

# The paper's rounding: params to 0.1M, FLOPs to 0.01B.
_PARAMS_DIGITS, _FLOPS_DIGITS = 1, 2

LATENCY_MODELS = ('nfnet_f0', 'nfnet_f1', 'nfnet_f2', 'nfnet_f3')
_IMAGENET_TRAIN_EXAMPLES = 1_281_167
# Progress goes to stderr; stdout carries only the paths written.
_LOG = functools.partial(print, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Output helpers.


def _fmt(value: Optional[float], digits: int = 2) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '—'
  return f'{value:.{digits}f}'


def _markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
  lines = [
      '| ' + ' | '.join(header) + ' |',
      '| ' + ' | '.join('---' for _ in header) + ' |',
  ]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def _write_csv(
    path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([['' if c is None else c for c in row] for row in rows])
  return path


def _write_text(path: str, text: str) -> str:
  with open(path, 'w') as f:
    f.write(text)
  return path


def _pyplot():
  # Imported lazily: only the plotting subcommands need matplotlib.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _int_at_least(
    low: int, below: Optional[int] = None
) -> Callable[[str], int]:
  """An argparse type: an integer >= `low` (and < `below`, if given)."""
  wanted = f'>= {low}' if below is None else f'in [{low}, {below})'

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < low or (below is not None and value >= below):
      raise argparse.ArgumentTypeError(
          f'expected an integer {wanted}, got {text!r}'
      )
    return value

  return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)
# The runner's seeds (data.check_seed): JAX's keys take their low 32 bits.
_SEEDS_END = 2**32
_seed = _int_at_least(0, _SEEDS_END)


def _once(values: list[Any], text: str) -> list[Any]:
  """`values`, refused if one repeats: its run would reuse another's folder."""
  seen = []
  for value in values:
    if value in seen:
      shown = 'none' if value is None else value
      raise argparse.ArgumentTypeError(
          f'{shown} is given twice in {text!r}; give each value once'
      )
    seen.append(value)
  return values


def _int_list(text: str) -> list[int]:
  """An argparse type: comma-separated integers >= 1 (blocks per stage)."""
  values = [_positive_int(v.strip()) for v in text.split(',') if v.strip()]
  if not values:
    raise argparse.ArgumentTypeError(f'expected integers >= 1, got {text!r}')
  return values


def _int_set(text: str) -> list[int]:
  """An argparse type: `_int_list` of settings to run, each once."""
  return _once(_int_list(text), text)


def _name(text: str) -> str:
  """An argparse type: one model name."""
  try:
    models.info(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def _name_list(text: str) -> list[str]:
  names = [_name(n.strip()) for n in text.split(',') if n.strip()]
  return _once(names, text)


def _choice_list(valid: Sequence[str]) -> Callable[[str], list[str]]:
  """An argparse type: a comma-separated list of items of `valid`."""

  def parse(text: str) -> list[str]:
    items = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in items if n not in valid]
    if unknown or not items:
      raise argparse.ArgumentTypeError(
          f'unknown {unknown} in {text!r}; valid: {list(valid)}'
      )
    return _once(items, text)

  return parse


def _clipping_list(text: str) -> list[Optional[float]]:
  values = []
  for item in text.split(','):
    item = item.strip().lower()
    if item in ('none', 'off'):
      values.append(None)
      continue
    try:
      value = float(item)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected numbers or 'none', got {item!r}"
      ) from None
    if not 0 < value < math.inf:  # NaN too
      raise argparse.ArgumentTypeError(
          f"lambda must be a number > 0 or 'none', got {item!r}"
      )
    values.append(value)
  return _once(values, text)


def _device_description() -> str:
  """The first device, e.g. 'GPU (NVIDIA H100 80GB HBM3), 1 local ...'."""
  device = jax.devices()[0]
  kind = device.device_kind
  if device.platform == 'cpu':
    # XLA calls every CPU 'cpu': name the processor and its cores instead.
    kind = f'{_cpu_model()}, {os.cpu_count()} cores'
  return (
      f'{device.platform.upper()} ({kind}), '
      f'{jax.local_device_count()} local device(s), JAX {jax.__version__}'
  )


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown processor'


# ----------------------------------------------------------------------------
# table3: parameters and FLOPs.


def _matches(ours: dict[str, Any], paper: dict[str, Any]) -> str:
  same_params = round(ours['params_m'], _PARAMS_DIGITS) == round(
      paper['params_m'], _PARAMS_DIGITS
  )
  same_flops = round(ours['flops_b'], _FLOPS_DIGITS) == round(
      paper['flops_b'], _FLOPS_DIGITS
  )
  if same_params and same_flops:
    return 'exact'
  d_params = 100 * (ours['params_m'] / paper['params_m'] - 1)
  d_flops = 100 * (ours['flops_b'] / paper['flops_b'] - 1)
  return f'no (params {d_params:+.1f}%, FLOPs {d_flops:+.1f}%)'


def _model_label(name: str) -> str:
  """A display name: 'nfnet_f3_plus' -> 'NFNet-F3+', 'nf_resnet50' -> ..."""
  info = models.info(name)
  variant = info.variant
  if info.family == 'nfnet':
    return f'NFNet-{variant}'
  if info.family == 'nf_resnet':
    return 'NF-' + variant.replace('ResNet', 'ResNet-')
  if info.family == 'nf_regnet':
    return f'NF-RegNet-{variant}'
  if info.family == 'resnet_bn':
    return variant.replace('ResNet', 'ResNet-') + ' (BN)'
  return name


def run_table3(args: argparse.Namespace) -> list[str]:
  """Params and FLOPs of every model at its test resolution vs Table 3."""
  names = args.models or TABLE3_MODELS
  rows_md, rows_csv, matched = [], [], []
  for name in names:
    start = time.time()
    ours = models.summary(name)
    _LOG(
        f'table3: {name} at {ours["image_size"]} px: '
        f'{ours["params_m"]:.2f}M params, {ours["flops_b"]:.3f}B FLOPs '
        f'({time.time() - start:.1f}s)'
    )
    paper = PAPER_TABLE3.get(name)
    match = _matches(ours, paper) if paper else ''
    if paper and name.startswith('nfnet_'):
      matched.append(match == 'exact')
    paper = paper or {}
    label = _model_label(name)
    if paper.get('label') and paper['label'] != label:
      label += f' (paper: {paper["label"]})'
    rows_md.append(
        [
            label,
            f'`{name}`',
            ours['image_size'],
            _fmt(ours['params_m'], _PARAMS_DIGITS),
            _fmt(paper.get('params_m'), _PARAMS_DIGITS),
            _fmt(ours['flops_b'], _FLOPS_DIGITS),
            _fmt(paper.get('flops_b'), _FLOPS_DIGITS),
            match or '—',
            _fmt(paper.get('top1'), 1),
            _fmt(paper.get('top5'), 1),
            _fmt(paper.get('tpuv3_ms'), 1),
            _fmt(paper.get('v100_ms'), 1),
        ]
    )
    rows_csv.append(
        [
            name,
            ours['family'],
            ours['variant'],
            ours['image_size'],
            f'{ours["params_m"]:.6f}',
            f'{ours["flops_b"]:.6f}',
            paper.get('label'),
            paper.get('params_m'),
            paper.get('flops_b'),
            match or None,
            paper.get('top1'),
            paper.get('top5'),
            paper.get('tpuv3_ms'),
            paper.get('v100_ms'),
        ]
    )

  header = [
      'Model',
      'Name',
      'Test px',
      'Params (M)',
      'Paper params (M)',
      'FLOPs (B)',
      'Paper FLOPs (B)',
      'Matches paper',
      'Paper top-1',
      'Paper top-5',
      'Paper TPUv3 ms/step',
      'Paper V100 ms/step',
  ]
  summary = (
      f'NFNet-F0..F6 rows matching the paper exactly (params to 0.1M '
      f'and FLOPs to 0.01B): {sum(matched)} of {len(matched)}.'
      if matched
      else 'No NFNet row of the paper was computed.'
  )
  text = (
      '# Table 3: parameters and FLOPs\n\n'
      'Computed by `python -m nfnets.reproduce table3` '
      '(`nfnets.models.summary`): parameters counted from the initialized '
      "model; FLOPs are multiply-adds of one image's forward pass (convs "
      'and dense layers, Squeeze-Excite and classifier included) at each '
      'model\'s test resolution, 1000 classes. Columns named "Paper" quote '
      'Table 3 of Brock et al. (2021), "High-Performance Large-Scale Image '
      'Recognition Without Normalization"; its F6 row is NFNet-F6+SAM '
      '(same architecture), and ResNet-50 is its comparator, here our BN '
      "ResNet-50 baseline. Accuracy and latency columns are the paper's "
      '(see `latency.md` for measured step times).\n\n'
      f'**{summary}**\n\n'
      + _markdown_table(header, rows_md)
      + f'\n{_PAPER_OTHER_ROWS}\n'
  )
  os.makedirs(args.results_dir, exist_ok=True)
  md = _write_text(os.path.join(args.results_dir, 'table3.md'), text)
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'table3.csv'),
      [
          'name',
          'family',
          'variant',
          'test_imsize',
          'params_m',
          'flops_b',
          'paper_label',
          'paper_params_m',
          'paper_flops_b',
          'matches_paper',
          'paper_top1',
          'paper_top5',
          'paper_tpuv3_ms',
          'paper_v100_ms',
      ],
      rows_csv,
  )
  return [md, csv_path]


# ----------------------------------------------------------------------------
# spp: signal propagation plots of real networks.


# The networks of the signal propagation plots, in drawing order.
SPP_VERSIONS = ('bn', 'nf', 'nf_no_ws', 'unnormalized')


def _spp_bases() -> list[str]:
  names = set(models.names())
  return sorted(
      n[len('nf_') :]
      for n in names
      if n.startswith('nf_resnet')
      and f'{n[len("nf_"):]}_bn' in names
      and f'{n[len("nf_"):]}_unnormalized' in names
  )


def run_spp(args: argparse.Namespace) -> list[str]:
  """Per-block statistics of four versions of a deep ResNet at init."""
  base = args.variant
  if base not in _spp_bases():
    raise ValueError(f'variant must be one of {_spp_bases()}, got {base!r}.')
  variant = models.info(f'nf_{base}').variant
  depth = tuple(args.depth or nf_resnet.variant_spec(variant)['depth'])
  if len(depth) != 4:
    raise ValueError(f'--depth needs 4 stages, got {depth}.')
  common = dict(width=args.width, depth=depth)
  # skipinit='ones': the branch is active at init, as the NF analysis
  # assumes (the release's default gain is 0, an identity network at init).
  nf = dict(
      common,
      skipinit='ones',
      alpha=args.alpha,
      stochdepth_rate=0.0,
      drop_rate=0.0,
  )
  versions = {
      'bn': (
          f'{base}_bn',
          'BN-ReLU ResNet (pre-activation)',
          f'{base}_bn',
          common,
      ),
      'nf': (f'nf_{base}', 'NF-ResNet (Scaled WS)', f'nf_{base}', nf),
      'nf_no_ws': (
          f'nf_{base}_no_ws',
          'NF-ResNet (plain convs, no WS)',
          f'nf_{base}',
          dict(nf, standardize=False),
      ),
      'unnormalized': (
          f'{base}_unnormalized',
          'Unnormalized ResNet (no BN)',
          f'{base}_unnormalized',
          common,
      ),
  }
  versions = [versions[v] for v in args.versions]
  curves, rows = [], []
  for key, label, name, overrides in versions:
    start = time.time()
    stats = signal_prop.model_signal_stats(
        name,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        **overrides,
    )
    _LOG(
        f'spp: {key}: {stats.num_blocks} blocks in '
        f'{time.time() - start:.1f}s'
    )
    curves.append((label, stats))
    for block in range(stats.num_blocks + 1):
      res = stats.res_avg_var[block - 1] if block else None
      rows.append(
          [
              key,
              block,
              repr(float(stats.avg_sq_mean[block])),
              repr(float(stats.avg_var[block])),
              None if res is None else repr(float(res)),
          ]
      )

  os.makedirs(args.results_dir, exist_ok=True)
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'spp.csv'),
      ['model', 'block', 'avg_sq_mean', 'avg_var', 'res_avg_var'],
      rows,
  )
  expected = signal_prop.nf_expected_variance(depth, args.alpha)
  png = os.path.join(args.results_dir, 'spp.png')
  signal_prop.plot_spp(
      curves,
      png,
      nf_expected=expected,
      title=(
          f'Signal propagation at initialization: {variant} depth '
          f'{depth} = {sum(depth)} blocks, width x{args.width:g}, '
          f'N(0,1) inputs {args.batch_size}x{args.image_size}x'
          f'{args.image_size}x3 (BN in training mode; NF: alpha '
          f'{args.alpha:g}, SkipInit gain 1)'
      ),
  )

  md_rows = []
  for (key, label, _, _), (_, stats) in zip(versions, curves):
    var = stats.avg_var[1:]
    finite = np.isfinite(var)
    first_bad = '—' if finite.all() else str(int(np.argmin(finite)) + 1)
    md_rows.append(
        [
            label,
            f'`{key}`',
            f'{float(np.min(var[finite])):.4g}',
            f'{float(np.max(var[finite])):.4g}',
            f'{float(var[-1]):.4g}',
            f'{float(np.max(stats.avg_sq_mean[1:])):.4g}',
            first_bad,
        ]
    )
  text = (
      '# Signal propagation at initialization\n\n'
      f'`python -m nfnets.reproduce spp`: {variant} depth {depth} '
      f'({sum(depth)} residual blocks) at width x{args.width:g}, '
      f'{args.batch_size} N(0, 1) images of {args.image_size}x'
      f'{args.image_size} px, seed {args.seed}. Statistics of the residual '
      "stream after each block, from the models' own `return_metrics` "
      '(block 0 = after the stem and max-pool; not counted below). '
      f'NF-ResNets: alpha {args.alpha:g}, SkipInit gain 1, no stochastic '
      'depth; expected variance after the k-th block of a stage '
      f'1 + k alpha^2 (max {float(expected.max()):.2f} here). Curves: '
      '`spp.png`; every value: `spp.csv`.\n\n'
      + _markdown_table(
          [
              'Network',
              'CSV model',
              'Min avg channel var',
              'Max avg channel var',
              'Final avg channel var',
              'Max avg channel squared mean',
              'First non-finite variance',
          ],
          md_rows,
      )
  )
  md = _write_text(os.path.join(args.results_dir, 'spp.md'), text)
  return [png, csv_path, md]


# ----------------------------------------------------------------------------
# variance: growth of the stream's variance with depth, minimal stack.

_SCHEME_LABELS = {
    'batchnorm': ('BatchNorm (pre-activation)', 'linear: 1, 2, 3, ...'),
    'unnormalized': ('Unnormalized', 'doubles: 2^d'),
    'skipinit_zeros': ('SkipInit, gain 0', 'stays 1'),
    'skipinit_inv_sqrt': ('SkipInit, gain 1/sqrt(d)', '(1 + 1/d)^d -> e'),
    'nf': ('NF strategy', '1 + d alpha^2'),
}


def _log2_sum(a: float, b: float) -> float:
  """log2(2^a + 2^b) without overflow."""
  if not (math.isfinite(a) and math.isfinite(b)):
    return a + b if math.isnan(a + b) else max(a, b)
  hi, lo = max(a, b), min(a, b)
  return hi + math.log2(1.0 + 2.0 ** (lo - hi))


def _pow2_text(log2_value: Optional[float], as_log: bool) -> str:
  if log2_value is None:
    return '—'
  if not math.isfinite(log2_value):
    return 'overflow (non-finite)'
  if as_log:
    return f'2^{log2_value:.1f}'
  return f'{2.0 ** log2_value:.3f}'


def run_variance(args: argparse.Namespace) -> list[str]:
  """Variance of the residual stream at depth d, per downscaling scheme."""
  alpha = args.alpha
  runs = []  # (scheme key, label, law, log_space)
  for scheme in args.schemes:
    label, law = _SCHEME_LABELS[scheme]
    if scheme == 'nf':
      label = f'NF strategy (alpha {alpha:g}, beta, Scaled WS)'
    if scheme == 'unnormalized':
      runs.append((scheme, label + ' (log space)', law, True))
      # The same stack measured directly: finite until float32 overflows.
      runs.append((scheme, label + ' (direct float32)', law, False))
    else:
      runs.append((scheme, label, law, False))
  summary_rows, block_rows, md_rows = [], [], []
  for depth in args.depths:
    for scheme, label, law, log_space in runs:
      start = time.time()
      stats = signal_prop.stack_signal_stats(
          scheme,
          depth,
          channels=args.channels,
          spatial=args.spatial,
          batch_size=args.batch_size,
          seed=args.seed,
          alpha=alpha,
          log_space=log_space,
      )
      method = 'log space' if log_space else 'float32'
      _LOG(
          f'variance: {scheme} ({method}), {depth} blocks: '
          f'{time.time() - start:.1f}s'
      )
      for k in range(depth + 1):
        lv = float(stats['log2_avg_var'][k])
        lm = _log2_sum(lv, float(stats['log2_avg_sq_mean'][k]))
        av = signal_prop.analytic_log2_variance(scheme, depth, k, alpha)
        am = signal_prop.analytic_log2_second_moment(scheme, depth, k, alpha)
        block_rows.append(
            [
                scheme,
                method,
                depth,
                k,
                repr(lv),
                repr(lm),
                None if av is None else repr(av),
                repr(am),
            ]
        )
      lv, lm, av, am = [
          float(r) if r not in (None, '') else None for r in block_rows[-1][4:8]
      ]
      summary_rows.append(
          [
              scheme,
              method,
              depth,
              repr(lv),
              repr(lm),
              None if av is None else repr(av),
              repr(am),
          ]
      )
      as_log = scheme == 'unnormalized'
      md_rows.append(
          [
              label,
              law,
              depth,
              _pow2_text(lv, as_log),
              _pow2_text(av, as_log),
              _pow2_text(lm, as_log),
              _pow2_text(am, as_log),
          ]
      )

  growth = [
      (int(r[2]), float(r[4]) / int(r[2]))
      for r in summary_rows
      if r[0] == 'unnormalized' and r[1] == 'log space'
  ]
  jensen = (
      ', '.join(f'{bits:.3f} bits per block at d = {d}' for d, bits in growth)
      or 'not measured'
  )
  os.makedirs(args.results_dir, exist_ok=True)
  header = [
      'scheme',
      'method',
      'depth',
      'log2_avg_var',
      'log2_avg_second_moment',
      'analytic_log2_avg_var',
      'analytic_log2_avg_second_moment',
  ]
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'variance.csv'), header, summary_rows
  )
  blocks_path = _write_csv(
      os.path.join(args.results_dir, 'variance_blocks.csv'),
      header[:3] + ['block'] + header[3:],
      block_rows,
  )
  text = (
      '# Residual stream variance at initialization vs depth\n\n'
      '`python -m nfnets.reproduce variance`. Measured on a minimal '
      'residual stack (`nfnets.signal_prop.ResidualStack`): one stage of d '
      'identical pre-activation bottleneck blocks (1x1 -> 3x3 -> 1x1, '
      f'relu before each conv, stream width {args.channels}, bottleneck '
      f'{max(1, args.channels // 4)}), no transition blocks, built from '
      "the project's `layers.WSConv2D`, `layers.nonlinearity` and "
      '`layers.skip_gain`, on '
      f'{args.batch_size} N(0, 1) inputs of {args.spatial}x{args.spatial} '
      f'(seed {args.seed}), one draw of the weights. BatchNorm = per-channel '
      'batch standardization (BatchNorm in training mode at init); '
      'baseline convs He-initialized and bias-free; NF: gamma-scaled relu, '
      'Scaled WS convs, input scaled by beta = 1/sqrt(1 + k alpha^2), branch '
      'by alpha. The 3x3 conv pads periodically, so that zero padding on '
      'these small maps does not shrink the signal.\n\n'
      "Var = average channel variance (the Signal Propagation Plots' "
      'quantity); E[h^2] = average channel second moment = Var + average '
      'channel squared mean. Analytic values are expectations over the '
      'random weights, derived in `signal_prop.analytic_log2_variance` / '
      '`analytic_log2_second_moment`: BatchNorm adds 1 to E[h^2] per block, '
      '1 - 1/pi of it as variance (the rest is channel means from the '
      'relu); without normalization the branch preserves E[h^2], so the '
      'stream doubles; "—" where the split between variance and channel '
      'means has no closed form.\n\n'
      'Unnormalized rows are in powers of two. "Log space": the stream is '
      'divided by its RMS after every block and the log2 of the factor is '
      'accumulated; at init every scheme here is positively homogeneous, '
      'so this is exact, and it is the only way to hold 2^1000 in float32: '
      'the "direct float32" rows show the same stack overflowing where it '
      'does. In one draw of a finite-width network, E[h^2] grows by less '
      'than 1 bit per block (here ' + jensen + '): the per-block growth '
      'factor fluctuates around its expectation 2, and the mean of its '
      "log2 is below 1 (Jensen's inequality).\n\n"
      + _markdown_table(
          [
              'Scheme',
              "Paper's law",
              'Blocks d',
              'Var measured',
              'Var analytic',
              'E[h^2] measured',
              'E[h^2] analytic',
          ],
          md_rows,
      )
      + '\nPer-block values: `variance_blocks.csv`.\n'
  )
  md = _write_text(os.path.join(args.results_dir, 'variance.md'), text)
  return [md, csv_path, blocks_path]


# ----------------------------------------------------------------------------
# latency: one training step at 32 images per device.


def _time_train_step(
    name: str,
    *,
    batch_size: int,
    image_size: int,
    dtype: str,
    steps: int,
    warmup: int,
) -> dict[str, float]:
  """Median seconds of the runner's train step for `name` on one device."""
  # Imported here: the runner pulls in the input pipelines and checkpoints.
  from configs import common  # pylint: disable=g-import-not-at-top
  from nfnets import resolve  # pylint: disable=g-import-not-at-top
  from nfnets import train  # pylint: disable=g-import-not-at-top

  info = models.info(name)
  config = common.get_config()
  config.model.family = info.family
  config.model.variant = info.variant
  config.train.batch_size = batch_size
  config.train.compute_dtype = dtype
  config.data.train_image_size = image_size
  config = resolve.resolve(config, _IMAGENET_TRAIN_EXAMPLES)
  num_classes = 1000
  forward = train.create_model(config, num_classes)
  optimizer, lr_fn = train.optimizer_and_schedule(config)
  kernel_layout = config.train.kernel_layout  # resolved above
  step_fn = train.make_device_step(
      config,
      forward=forward,
      optimizer=optimizer,
      lr_fn=lr_fn,
      num_classes=num_classes,
      with_metrics=False,
  )
  # One device: the paper's latency is per device, at 32 images each.
  device = jax.local_devices()[0]
  p_step = jax.pmap(
      step_fn, axis_name=train.AXIS_NAME, devices=[device], donate_argnums=(0,)
  )
  # Laid out as the step's own outputs are, so that it compiles only once.
  to_device = jax.pmap(
      lambda tree: tree, axis_name=train.AXIS_NAME, devices=[device]
  )

  def replicate(tree):
    return to_device(
        jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)
    )

  start = time.time()
  state = replicate(
      train.to_device_layout(
          train.create_train_state(
              jax.random.PRNGKey(0),
              forward,
              optimizer,
              image_size,
              train.initial_loss_scale(config),
          ),
          kernel_layout,
      )
  )
  init_s = time.time() - start
  rng = np.random.default_rng(0)
  labels = rng.integers(0, num_classes, (batch_size,)).astype(np.int32)
  batch = replicate(
      dict(
          images=rng.standard_normal(
              (batch_size, image_size, image_size, 3)
          ).astype(np.float32),
          labels=labels,
          labels2=labels,
          mix_ratio=np.ones((batch_size,), np.float32),
      )
  )

  start = time.time()
  state, metrics = p_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.time() - start
  for _ in range(warmup):
    state, metrics = p_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.time()
    state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.time() - start)
  loss = float(np.asarray(metrics['train_loss'])[0])
  if not math.isfinite(loss):
    raise RuntimeError(
        f'{name}: the timed step produced a non-finite loss ' f'({loss}).'
    )
  return dict(
      median_s=statistics.median(times),
      min_s=min(times),
      compile_s=compile_s,
      init_s=init_s,
  )


def run_latency(args: argparse.Namespace) -> list[str]:
  """Median train-step time of F0-F3 on this device, beside Table 3's."""
  if args.shrink:
    batch_size = args.batch_size or 2
    steps = args.steps or 3
    warmup = 1 if args.warmup is None else args.warmup
  else:
    batch_size = args.batch_size or 32
    steps = args.steps or 20
    warmup = 3 if args.warmup is None else args.warmup
  device = _device_description()
  rows_md, rows_csv = [], []
  for name in args.models:
    image_size = args.image_size or (
        32 if args.shrink else models.info(name).train_imsize
    )
    _LOG(
        f'latency: {name} at {image_size} px, batch {batch_size}, '
        f'{args.dtype} on {device}...'
    )
    timing = _time_train_step(
        name,
        batch_size=batch_size,
        image_size=image_size,
        dtype=args.dtype,
        steps=steps,
        warmup=warmup,
    )
    _LOG(
        f'latency: {name}: {1000 * timing["median_s"]:.1f} ms/step '
        f'(compile {timing["compile_s"]:.1f}s)'
    )
    paper = PAPER_TABLE3.get(name, {})
    rows_md.append(
        [
            paper.get('label', name),
            f'`{name}`',
            image_size,
            batch_size,
            args.dtype,
            _fmt(1000 * timing['median_s'], 1),
            _fmt(1000 * timing['min_s'], 1),
            _fmt(timing['compile_s'], 1),
            _fmt(paper.get('tpuv3_ms'), 1),
            _fmt(paper.get('v100_ms'), 1),
        ]
    )
    rows_csv.append(
        [
            name,
            image_size,
            batch_size,
            args.dtype,
            steps,
            repr(1000 * timing['median_s']),
            repr(1000 * timing['min_s']),
            repr(timing['compile_s']),
            paper.get('tpuv3_ms'),
            paper.get('v100_ms'),
            device,
            bool(args.shrink),
        ]
    )
  if args.shrink:
    banner = (
        f'**SHRUNK RUN** (`--shrink`): {batch_size} images per step at the '
        'resolution below instead of 32 at the training resolution, so that '
        'it runs on a CPU. It checks that the step runs and how the cost '
        'grows from F0 to F3; its milliseconds are NOT comparable with the '
        "paper's columns.\n\n"
    )
  else:
    banner = ''
  text = (
      '# Training step latency\n\n' + banner + f'Device: **{device}**.\n\n'
      '`python -m nfnets.reproduce latency'
      + (' --shrink' if args.shrink else '')
      + "`: one step of the runner's "
      '`nfnets.train.train_step` (forward, backward, AGC, weight decay, '
      "SGD-Nesterov, EMA) on one device, the paper's recipe "
      '(`configs/common.py`: dropout, stochastic depth 0.25, label '
      f'smoothing), compute dtype {args.dtype}, params float32. Median and '
      f'minimum over {steps} timed steps after {warmup} untimed one(s); '
      'compile = '
      'the first call. Paper: Table 3 of Brock et al. (2021), one training '
      'step at 32 images per device, TPUv3 (32 devices, bf16) and V100 '
      '(fp16).\n\n'
      + _markdown_table(
          [
              'Model',
              'Name',
              'Image px',
              'Images/device',
              'Dtype',
              'Measured ms/step (median)',
              'Measured ms/step (min)',
              'Compile s',
              'Paper TPUv3 ms/step',
              'Paper V100 ms/step',
          ],
          rows_md,
      )
  )
  os.makedirs(args.results_dir, exist_ok=True)
  md = _write_text(os.path.join(args.results_dir, 'latency.md'), text)
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'latency.csv'),
      [
          'name',
          'image_size',
          'batch_size',
          'dtype',
          'steps',
          'median_ms',
          'min_ms',
          'compile_s',
          'paper_tpuv3_ms',
          'paper_v100_ms',
          'device',
          'shrunk',
      ],
      rows_csv,
  )
  return [md, csv_path]


# ----------------------------------------------------------------------------
# agc and depth: small training runs through the runner.


def _train_module():
  """`nfnets.train`, or a clear error while the runner is missing."""
  try:
    from nfnets import train  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        'This subcommand trains through nfnets.train.train_and_evaluate, '
        f'which could not be imported: {e}'
    ) from e
  return train


@contextlib.contextmanager
def _compilation_cache(directory: Optional[str]):
  """Enables JAX's persistent compilation cache in `directory`.

  The runner compiles its init, train and eval steps for every run; within a
  sweep most of those programs repeat (the init and eval programs only
  depend on the model), and the cache, keyed by the compiled program,
  halves the time of each run after the first on a CPU.

  Args:
    directory: the cache directory. None: keep the cache JAX is already
      configured with (e.g. by `JAX_COMPILATION_CACHE_DIR`), else use a
      temporary one for the duration.

  Yields:
    Nothing; JAX's settings are restored on exit.
  """
  names = (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
  )
  previous = {n: getattr(jax.config, n) for n in names}
  if directory is None and previous['jax_compilation_cache_dir']:
    yield
    return
  with contextlib.ExitStack() as stack:
    if directory is None:
      directory = stack.enter_context(
          tempfile.TemporaryDirectory(prefix='nfnets_jax_cache_')
      )
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    try:
      yield
    finally:
      for name, value in previous.items():
        jax.config.update(name, value)


def _digits_config(
    *,
    model_name: str,
    overrides: dict[str, Any],
    batch_size: int,
    epochs: float,
    base_lr: float,
    clipping: Optional[float],
    image_size: int,
    log_every: int,
    seed: int,
):
  """The demo config (configs/default.py) with this experiment's changes."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  info = models.info(model_name)
  config = default.get_config()
  config.seed = seed
  config.model.family = info.family
  config.model.variant = info.variant
  config.model.overrides = ml_collections.ConfigDict(overrides)
  config.train.batch_size = batch_size
  config.train.num_epochs = epochs
  config.train.log_every_steps = log_every
  config.train.eval_every_epochs = 0  # only the final evaluation
  # One checkpoint at the end: these runs are not resumed.
  config.train.checkpoint_every_steps = 10**9
  config.eval.ema = False
  config.optimizer.base_lr = base_lr
  config.optimizer.agc.clipping = clipping
  config.data.train_image_size = image_size
  config.data.eval_image_size = image_size
  return config


def _planned_steps(config) -> int:
  """The steps the runner will take for this config (its own rule)."""
  from nfnets import data  # pylint: disable=g-import-not-at-top
  from nfnets import resolve  # pylint: disable=g-import-not-at-top

  num_train = data.num_examples(config.data, 'train')
  return resolve.steps_from_epochs(config, num_train).total


def _read_curve(workdir: str) -> list[tuple[int, float]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records, _ = jsonl.parse(f.read())
  return [(r['step'], r['train_loss']) for r in records if 'train_loss' in r]


# A final training loss this far above chance (ln 10 for the 10 digits) is
# a blow-up that stayed finite: a run that merely fails to learn sits near
# ln 10, one whose learning rate is too large for it climbs far above.
_DIVERGED_LOSS = 2 * math.log(10)


class Interrupted(Exception):
  """A training run stopped early on SIGTERM or Ctrl-C.

  The runner treats both as a preemption: it saves and returns. The
  subcommand then stops too and writes nothing.
  """


def _train_run(config, workdir: str) -> dict[str, Any]:
  """Trains; returns final metrics plus `status` / `diverged`.

  Raises:
    Interrupted: the run was stopped by SIGTERM or Ctrl-C.
  """
  try:
    return _train_once(config, workdir)
  finally:
    # Each run compiles its own programs, and JAX's caches keep them, with
    # the ~2,700 memory mappings of each run's CPU code: an experiment of
    # 20-odd runs in one process reached Linux's 65,530 and crashed.
    jax.clear_caches()


def _train_once(config, workdir: str) -> dict[str, Any]:
  """`_train_run`'s training and its result, caches left as they are."""
  train = _train_module()
  start = time.time()
  try:
    # The runner reports progress on stdout, which carries only our paths.
    with contextlib.redirect_stdout(sys.stderr):
      metrics = train.train_and_evaluate(config, workdir)
      if metrics.get('preempted'):
        # The runner saved and returned; its workdir is temporary, so
        # there is nothing to resume: stop rather than tabulate half a run.
        raise Interrupted(f'interrupted at step {metrics["step"]}')
  except train.NonFiniteError as e:
    return dict(
        status=f'non-finite {e.metric} at step {e.step}',
        diverged=True,
        step=e.step,
        eval_top1=None,
        train_loss=None,
        eval_loss=None,
        wall_s=time.time() - start,
    )
  diverged = not metrics['train_loss'] <= _DIVERGED_LOSS
  return dict(
      status='diverged (loss > 2 ln 10)' if diverged else 'ok',
      diverged=diverged,
      step=metrics['step'],
      eval_top1=metrics['eval_top1'],
      train_loss=metrics['train_loss'],
      eval_loss=metrics['eval_loss'],
      wall_s=time.time() - start,
  )


def _check_seeds(args: argparse.Namespace) -> tuple[list[int], int]:
  """(the seeds, how many best to average) of `--num_seeds/--average_best`."""
  if args.average_best is None:  # The paper's 4 of 5.
    wanted = min(4, args.num_seeds)
  else:
    wanted = args.average_best or args.num_seeds
  if wanted > args.num_seeds:
    raise ValueError(
        f'--average_best={args.average_best} is more than'
        f' --num_seeds={args.num_seeds}; give at most {args.num_seeds}.'
    )
  if args.seed + args.num_seeds > _SEEDS_END:
    raise ValueError(
        f'--seed={args.seed} with --num_seeds={args.num_seeds} runs seeds'
        f' up to {args.seed + args.num_seeds - 1}; seeds must be below'
        f' {_SEEDS_END}: give --seed <= {_SEEDS_END - args.num_seeds}.'
    )
  return [args.seed + i for i in range(args.num_seeds)], wanted


def _agc_cell(runs: Sequence[dict[str, Any]], wanted: int) -> dict[str, Any]:
  """One (batch, lambda) cell over its seeds: the mean of the best `wanted`.

  The NFNets paper's protocol for its AGC sweep (5 seeds, best 4 averaged):
  a seed that diverged is one of those left out, and a cell with fewer
  finished seeds than `wanted` has no value.
  """
  best = [
      r
      for _, r in sweep.best_seeds(
          [(r['eval_top1'], r) for r in runs if not r['diverged']], wanted
      )
  ]
  top1 = sum(r['eval_top1'] for r in best) / len(best) if best else None
  diverged = [r for r in runs if r['diverged']]
  if len(runs) == 1:  # One seed: the run's own value and status.
    (run,) = runs
    if run['eval_top1'] is None:
      text = f'— ({run["status"]})'
    else:
      text = f'{100 * run["eval_top1"]:.1f}'
      if run['status'] != 'ok':
        text += f' ({run["status"]})'
  else:
    text = '—' if top1 is None else f'{100 * top1:.1f}'
    if diverged:
      text += f' ({len(diverged)} of {len(runs)} diverged)'
  return dict(top1=top1, text=text, seeds=[r['seed'] for r in best])


def run_agc(args: argparse.Namespace) -> list[str]:
  """Batch size x AGC lambda (and no AGC) on the embedded digits."""
  seeds, wanted = _check_seeds(args)
  overrides = dict(width=args.width, skipinit='inv_sqrt')
  if args.depth:
    overrides['depth'] = tuple(args.depth)
  results = []
  with (
      tempfile.TemporaryDirectory(prefix='nfnets_agc_') as root,
      _compilation_cache(args.compilation_cache_dir),
  ):
    for batch_size in args.batch_sizes:
      for clipping in args.clippings:
        for seed in seeds:
          config = _digits_config(
              model_name=args.model,
              overrides=overrides,
              batch_size=batch_size,
              epochs=args.epochs,
              base_lr=args.base_lr,
              clipping=clipping,
              image_size=args.image_size,
              log_every=max(1, args.log_every),
              seed=seed,
          )
          what = f'agc: batch {batch_size}, lambda {clipping}, seed {seed}'
          _LOG(f'{what}...')
          result = _train_run(
              config, os.path.join(root, f'b{batch_size}_{clipping}_s{seed}')
          )
          result['planned_steps'] = _planned_steps(config)
          _LOG(
              f'{what}: {result["status"]}, top-1 {result["eval_top1"]} '
              f'({result["wall_s"]:.0f}s)'
          )
          results.append(
              dict(
                  batch_size=batch_size,
                  clipping=clipping,
                  seed=seed,
                  lr=args.base_lr * batch_size / 256,
                  **result,
              )
          )

  os.makedirs(args.results_dir, exist_ok=True)
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'agc.csv'),
      [
          'batch_size',
          'clipping',
          'seed',
          'lr',
          'planned_steps',
          'steps',
          'eval_top1',
          'train_loss',
          'eval_loss',
          'diverged',
          'status',
          'wall_s',
      ],
      [
          [
              r['batch_size'],
              'none' if r['clipping'] is None else r['clipping'],
              r['seed'],
              r['lr'],
              r['planned_steps'],
              r['step'],
              r['eval_top1'],
              r['train_loss'],
              r['eval_loss'],
              r['diverged'],
              r['status'],
              round(r['wall_s'], 1),
          ]
          for r in results
      ],
  )
  cells = {
      (b, c): _agc_cell(
          [r for r in results if r['batch_size'] == b and r['clipping'] == c],
          wanted,
      )
      for b in args.batch_sizes
      for c in args.clippings
  }

  def clip_name(c):
    return 'no AGC' if c is None else f'lambda {c:g}'

  md_rows = []
  for batch_size in args.batch_sizes:
    row = [cells[batch_size, c] for c in args.clippings]
    scored = [
        (cell['top1'], c)
        for cell, c in zip(row, args.clippings)
        if cell['top1'] is not None
    ]
    best = max(scored, key=lambda pair: pair[0], default=None)
    steps = next(
        r['planned_steps'] for r in results if r['batch_size'] == batch_size
    )
    md_rows.append(
        [batch_size, f'{args.base_lr * batch_size / 256:.4g}', steps]
        + [cell['text'] for cell in row]
        + [clip_name(best[1]) if best else '—']
    )
  if len(seeds) == 1:
    protocol = f'seed {seeds[0]}, one run per cell. Cells: final test top-1'
  else:
    protocol = (
        f'seeds {seeds[0]}-{seeds[-1]}; each cell is the mean final test'
        f' top-1 of its best {wanted} of {len(seeds)} seeds (the NFNets'
        " paper's protocol is 4 of 5), a diverged seed being one of those"
        ' left out, and "—" where fewer finished. Cells: mean test top-1'
    )
  text = (
      '# Adaptive Gradient Clipping: batch size x lambda\n\n'
      '`python -m nfnets.reproduce agc`: the demo recipe '
      f'(`configs/default.py`) with `{args.model}`'
      + (f' (depth {tuple(args.depth)})' if args.depth else '')
      + f' at width x{args.width:g} '
      f'(SkipInit gain 1/sqrt(blocks)), {args.image_size} px digits, '
      f'{args.epochs:g} epochs at every batch size, learning rate '
      f'{args.base_lr:g} x batch / 256 (SGD-Nesterov, cosine, 1 warm-up '
      f'epoch), {protocol} '
      '(%) on the 360 held-out digits; a run "diverged" when its loss or '
      'gradients became non-finite (the runner stops it) or its final '
      'training loss ended above 2 ln 10 (twice chance). Device: '
      f'{_device_description()}.\n\n'
      + _markdown_table(
          ['Batch', 'lr', 'Steps']
          + [clip_name(c) for c in args.clippings]
          + ['Best'],
          md_rows,
      )
      + '\nFor comparison, the NFNets paper sweeps lambda in {0.01, 0.02, '
      '0.04, 0.08, 0.16} for NF-ResNet-50/200 on ImageNet (90 epochs, batch '
      '256-4096, 5 seeds with the best 4 averaged), finds that larger '
      'batches need smaller lambda, and uses AGC as its replacement for what '
      'BatchNorm gives large-batch training. This grid is a small-scale '
      'analogue on digits, not a reproduction.\n'
  )
  md = _write_text(os.path.join(args.results_dir, 'agc.md'), text)

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  for clipping in args.clippings:
    scored = [
        b for b in args.batch_sizes if cells[b, clipping]['top1'] is not None
    ]
    (line,) = ax.plot(
        scored,
        [100 * cells[b, clipping]['top1'] for b in scored],
        'o-',
        label=clip_name(clipping),
    )
    # Diverged cells have no accuracy: a cross on the x axis marks them.
    bad = [b for b in args.batch_sizes if b not in scored]
    if bad:
      ax.plot(
          bad,
          [0.0] * len(bad),
          'x',
          color=line.get_color(),
          markersize=12,
          markeredgewidth=2,
          clip_on=False,
      )
  ax.set_xscale('log', base=2)
  ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
  ax.set_xlabel('Batch size (lr = %g x batch / 256)' % args.base_lr)
  ax.set_ylabel(
      'Final test top-1 (%)'
      if len(seeds) == 1
      else f'Mean test top-1 of the best {wanted} of {len(seeds)} seeds (%)'
  )
  ax.set_ylim(0, 100)
  ax.set_title(
      f'AGC on digits: {args.model} x{args.width:g}, '
      f'{args.epochs:g} epochs (x on the axis = diverged)'
  )
  ax.grid(True, alpha=0.3)
  ax.legend()
  png = os.path.join(args.results_dir, 'agc.png')
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return [md, csv_path, png]


# The networks of the depth experiment: key -> (label, registry name).
DEPTH_NETWORKS = {
    'unnormalized': ('Unnormalized ResNet', 'resnet26_unnormalized'),
    'skipinit': ('SkipInit ResNet (gain 0)', 'resnet26_skipinit'),
    'nf': ('NF-ResNet', 'nf_resnet26'),
}


def _stages(blocks: int) -> tuple[int, ...]:
  """`blocks` spread over 4 stages, earlier stages taking the remainder."""
  base, extra = divmod(blocks, 4)
  if base < 1:
    raise ValueError(f'Need at least 4 blocks (one per stage), got {blocks}.')
  return tuple(base + (i < extra) for i in range(4))


def run_depth(args: argparse.Namespace) -> list[str]:
  """Unnormalized vs SkipInit vs NF-ResNet at two depths, brief training."""
  results = []
  with (
      tempfile.TemporaryDirectory(prefix='nfnets_depth_') as root,
      _compilation_cache(args.compilation_cache_dir),
  ):
    for blocks in args.blocks:
      for key in args.networks:
        label, name = DEPTH_NETWORKS[key]
        overrides = dict(width=args.width, depth=_stages(blocks))
        config = _digits_config(
            model_name=name,
            overrides=overrides,
            batch_size=args.batch_size,
            epochs=args.epochs,
            base_lr=args.base_lr,
            clipping=args.clipping,
            image_size=args.image_size,
            log_every=1,
            seed=args.seed,
        )
        workdir = os.path.join(root, f'{name}_{blocks}')
        _LOG(f'depth: {label}, {blocks} blocks...')
        result = _train_run(config, workdir)
        _LOG(
            f'depth: {label}, {blocks} blocks: {result["status"]}, top-1 '
            f'{result["eval_top1"]} ({result["wall_s"]:.0f}s)'
        )
        results.append(
            dict(
                label=label,
                name=name,
                blocks=blocks,
                curve=_read_curve(workdir),
                **result,
            )
        )

  os.makedirs(args.results_dir, exist_ok=True)
  csv_path = _write_csv(
      os.path.join(args.results_dir, 'depth.csv'),
      ['name', 'blocks', 'step', 'train_loss'],
      [
          [r['name'], r['blocks'], step, loss]
          for r in results
          for step, loss in r['curve']
      ],
  )
  md_rows = [
      [
          r['label'],
          f'`{r["name"]}`',
          r['blocks'],
          _fmt(r['curve'][0][1], 3) if r['curve'] else '—',
          _fmt(r['train_loss'], 3),
          _fmt(None if r['eval_top1'] is None else 100 * r['eval_top1'], 1),
          r['status'],
      ]
      for r in results
  ]
  clip = 'no AGC' if args.clipping is None else f'AGC lambda {args.clipping:g}'
  text = (
      '# Training at depth: unnormalized vs SkipInit vs NF-ResNet\n\n'
      '`python -m nfnets.reproduce depth`: the demo recipe '
      f'(`configs/default.py`) on {args.image_size} px digits, '
      f'{args.epochs:g} epochs at batch {args.batch_size}, learning rate '
      f'{args.base_lr:g} x batch / 256, {clip}, seed {args.seed}. Networks: '
      f"the registry's bottleneck ResNets at width x{args.width:g} with "
      'the blocks spread over 4 stages; SkipInit and NF-ResNet gains start '
      'at 0 (their definitions); no dropout or stochastic depth. Loss '
      'curves: `depth.png` (every step: `depth.csv`). Device: '
      f'{_device_description()}.\n\n'
      + _markdown_table(
          [
              'Network',
              'Model',
              'Blocks',
              'First logged loss',
              'Final train loss',
              'Test top-1 (%)',
              'Status',
          ],
          md_rows,
      )
  )
  md = _write_text(os.path.join(args.results_dir, 'depth.md'), text)

  plt = _pyplot()
  fig, axes = plt.subplots(
      1,
      len(args.blocks),
      figsize=(6 * len(args.blocks), 4.5),
      constrained_layout=True,
      squeeze=False,
  )
  for ax, blocks in zip(axes[0], args.blocks):
    for r in [r for r in results if r['blocks'] == blocks]:
      label = (
          r['label']
          if r['status'] == 'ok'
          else (f'{r["label"]}: {r["status"]}')
      )
      if r['curve']:
        steps, losses = zip(*r['curve'])
        ax.plot(steps, losses, label=label)
      else:
        ax.plot([], [], label=label)
    # Linear, up to twice chance: learning shows; a blow-up leaves the top
    # (its legend entry says where it stopped).
    ax.axhline(math.log(10), color='gray', linestyle=':', linewidth=1)
    ax.text(
        0.99,
        math.log(10),
        'chance (ln 10)',
        color='gray',
        fontsize=8,
        ha='right',
        va='bottom',
        transform=ax.get_yaxis_transform(),
    )
    ax.set_ylim(0, _DIVERGED_LOSS)
    ax.set_xlabel('Training step')
    ax.set_ylabel('Training loss')
    ax.set_title(f'{blocks} residual blocks')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
      f'Digits, batch {args.batch_size}, lr {args.base_lr:g} x '
      f'batch/256, {clip}'
  )
  png = os.path.join(args.results_dir, 'depth.png')
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return [md, csv_path, png]


# ----------------------------------------------------------------------------
# Command line.

SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], list[str]], str]
] = {
    'table3': (run_table3, 'params and FLOPs vs Table 3 of the NFNets paper'),
    'spp': (run_spp, 'signal propagation plots of a deep ResNet at init'),
    'variance': (run_variance, 'stream variance at depth 16/100/1000'),
    'latency': (run_latency, 'training step time of F0-F3 on this device'),
    'agc': (run_agc, 'batch size x AGC lambda on the embedded digits'),
    'depth': (run_depth, 'unnormalized vs SkipInit vs NF-ResNet training'),
}


def _clipping(text: str) -> Optional[float]:
  """An argparse type: one AGC lambda > 0, or 'none'."""
  values = _clipping_list(text)
  if len(values) != 1:
    raise argparse.ArgumentTypeError(
        f"expected one lambda or 'none', got {text!r}"
    )
  return values[0]


def _positive_float(text: str) -> float:
  """An argparse type: a finite number > 0 (a width, epochs, a rate)."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0 < value < math.inf:
    raise argparse.ArgumentTypeError(f'expected a number > 0, got {text!r}')
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser, one sub-parser per subcommand."""
  parser = argparse.ArgumentParser(
      prog='python -m nfnets.reproduce', description=__doc__.split('\n\n')[0]
  )
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
      '--results_dir',
      default='results',
      help='where the files go (created if missing)',
  )
  sub = parser.add_subparsers(
      dest='command', metavar='{' + ','.join(SUBCOMMANDS) + '}', required=True
  )
  parsers = {
      name: sub.add_parser(
          name, parents=[common], help=help_text, description=help_text
      )
      for name, (_, help_text) in SUBCOMMANDS.items()
      if name not in ('agc', 'depth')
  }

  p = parsers['table3']
  p.add_argument(
      '--models',
      type=_name_list,
      default=None,
      help='comma-separated registry names (default: all rows)',
  )

  p = parsers['spp']
  p.add_argument(
      '--variant',
      default='resnet600',
      choices=_spp_bases(),
      help='depth of the four networks (default: resnet600)',
  )
  p.add_argument(
      '--depth',
      type=_int_list,
      default=None,
      help='blocks per stage, overriding the variant, e.g. 3,3,3,3',
  )
  p.add_argument(
      '--versions',
      type=_choice_list(SPP_VERSIONS),
      default=list(SPP_VERSIONS),
      help=f'comma-separated, of {",".join(SPP_VERSIONS)}',
  )
  p.add_argument(
      '--width',
      type=_positive_float,
      default=0.25,
      help='width multiplier (1: 16 stem, 64..512 channels)',
  )
  p.add_argument('--image_size', type=_positive_int, default=128)
  p.add_argument('--batch_size', type=_positive_int, default=8)
  p.add_argument('--alpha', type=float, default=0.2)
  p.add_argument('--seed', type=_seed, default=0)

  p = parsers['variance']
  p.add_argument(
      '--depths',
      type=_int_set,
      default=[16, 100, 1000],
      help='stack depths (blocks)',
  )
  p.add_argument(
      '--schemes',
      type=_choice_list(signal_prop.SCHEMES),
      default=list(signal_prop.SCHEMES),
      help=f'comma-separated, of {",".join(signal_prop.SCHEMES)}',
  )
  p.add_argument(
      '--channels',
      type=_positive_int,
      default=256,
      help='width of the residual stream',
  )
  p.add_argument(
      '--spatial', type=_positive_int, default=8, help='feature map side'
  )
  p.add_argument('--batch_size', type=_positive_int, default=8)
  p.add_argument('--alpha', type=float, default=0.2)
  p.add_argument('--seed', type=_seed, default=0)

  p = parsers['latency']
  p.add_argument(
      '--shrink',
      action='store_true',
      help='CPU-sized: 32 px, batch 2, 3 steps (labelled shrunk)',
  )
  p.add_argument('--models', type=_name_list, default=list(LATENCY_MODELS))
  p.add_argument(
      '--batch_size',
      type=_positive_int,
      default=None,
      help='images per device (default 32; 2 with --shrink)',
  )
  p.add_argument(
      '--image_size',
      type=_positive_int,
      default=None,
      help="default: each model's training resolution; 32 with " '--shrink',
  )
  p.add_argument(
      '--steps',
      type=_positive_int,
      default=None,
      help='timed steps (default 20; 3 with --shrink)',
  )
  p.add_argument(
      '--warmup',
      type=_nonnegative_int,
      default=None,
      help='untimed steps after compiling (default 3; 1 shrunk)',
  )
  p.add_argument(
      '--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32']
  )

  training = argparse.ArgumentParser(add_help=False)
  training.add_argument(
      '--compilation_cache_dir',
      default=None,
      help="JAX's persistent compilation cache (default: a temporary "
      'directory for this run)',
  )
  for name in ('agc', 'depth'):
    parsers[name] = sub.add_parser(
        name,
        parents=[common, training],
        help=SUBCOMMANDS[name][1],
        description=SUBCOMMANDS[name][1],
    )

  p = parsers['agc']
  p.add_argument('--batch_sizes', type=_int_set, default=[64, 256, 1024])
  p.add_argument(
      '--clippings',
      type=_clipping_list,
      default=[None, 0.01, 0.02, 0.04, 0.08, 0.16],
      help="AGC lambdas; 'none' = no AGC",
  )
  p.add_argument(
      '--base_lr',
      type=_positive_float,
      default=0.1,
      help='learning rate per 256 images',
  )
  p.add_argument('--epochs', type=_positive_float, default=10)
  p.add_argument('--model', type=_name, default='nf_resnet26')
  p.add_argument(
      '--depth',
      type=_int_list,
      default=None,
      help="blocks per stage (default: the model's)",
  )
  p.add_argument('--width', type=_positive_float, default=0.25)
  p.add_argument('--image_size', type=_positive_int, default=16)
  p.add_argument('--log_every', type=_positive_int, default=10)
  p.add_argument('--seed', type=_seed, default=0, help='the first seed')
  # The NFNets paper's protocol for its AGC sweep: 5 seeds, best 4 averaged.
  p.add_argument(
      '--num_seeds',
      type=_positive_int,
      default=5,
      help='seeds per cell: --seed, --seed + 1, ...',
  )
  p.add_argument(
      '--average_best',
      type=_nonnegative_int,
      default=None,
      help=(
          'each cell averages its best this many seeds; 0: all (default: 4,'
          ' or all of fewer)'
      ),
  )

  p = parsers['depth']
  p.add_argument(
      '--blocks',
      type=_int_set,
      default=[16, 100],
      help='residual blocks (spread over 4 stages)',
  )
  p.add_argument(
      '--networks',
      type=_choice_list(tuple(DEPTH_NETWORKS)),
      default=list(DEPTH_NETWORKS),
      help=f'comma-separated, of {",".join(DEPTH_NETWORKS)}',
  )
  p.add_argument('--batch_size', type=_positive_int, default=64)
  p.add_argument('--epochs', type=_positive_float, default=5)
  p.add_argument(
      '--base_lr',
      type=_positive_float,
      default=0.1,
      help=(
          "learning rate per 256 images (0.1: the paper's; the demo's 0.4 "
          'needs AGC)'
      ),
  )
  p.add_argument(
      '--clipping',
      type=_clipping,
      default=None,
      help="AGC lambda, or 'none' (default: none)",
  )
  p.add_argument('--width', type=_positive_float, default=0.25)
  p.add_argument('--image_size', type=_positive_int, default=16)
  p.add_argument('--seed', type=_seed, default=0)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one subcommand; prints the paths it wrote, one per line."""
  args = build_parser().parse_args(argv)
  func, _ = SUBCOMMANDS[args.command]
  start = time.time()
  where = f'python -m nfnets.reproduce {args.command}'
  # Checked first: the files are written after the work, which can take
  # hours (agc, depth).
  if '://' in args.results_dir:
    # The files are written with open(): 'gs://b/x' would be a local path.
    sys.exit(
        f'{where}: error: --results_dir={args.results_dir} is a URL; give a'
        ' local folder (copy the files to the bucket afterwards).'
    )
  try:
    os.makedirs(args.results_dir, exist_ok=True)
    # A file written and removed: os.access says yes to root everywhere.
    with tempfile.TemporaryFile(dir=args.results_dir):
      pass
  except OSError as e:
    sys.exit(
        f'{where}: error: --results_dir: cannot write to'
        f' {args.results_dir} ({e}).'
    )
  try:
    paths = func(args)
  except Interrupted as e:
    sys.exit(f'{where}: {e}; no results written.')
  except (ValueError, FileNotFoundError) as e:
    # A value the runner or a model refuses: one line, as experiment.py.
    sys.exit(f'{where}: error: {e}')
  for path in paths:
    print(path, flush=True)
  _LOG(f'{args.command}: done in {time.time() - start:.0f}s.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
