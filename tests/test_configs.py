"""Configs: every file and variant loads, derived values follow overrides."""

import glob
import importlib
import os
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from nfnets import cli
from nfnets import optim
from nfnets import resolve
from nfnets import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if not os.path.basename(p).startswith(('_', 'common'))
)
IMAGENET_TRAIN = 1_281_167

VARIANT_ARGS = {
    'nfnet': (
        [f'F{i}{p}' for p in ('', '+') for i in range(8)]
        + ['F0,local', 'F7+,local']
    ),
    'nf_resnet': ['26', '50', '101', '152', '200', '50,360ep', '50,local'],
    'nf_regnet': [f'B{i}' for i in range(9)] + ['B0,local'],
    'resnet_bn': ['50', '101,local'],
    'resnet_skipinit': ['50', '50,local'],
    'resnet_fixup': ['50', '50,local'],
    'resnet_unnormalized': ['50', '50,local'],
    'default': [None],
}


def test_every_config_file_is_covered():
  assert sorted(VARIANT_ARGS) == CONFIG_FILES


@pytest.mark.parametrize(
    'name,arg',
    [(name, arg) for name, args in VARIANT_ARGS.items() for arg in args],
)
def test_every_config_and_variant_loads_and_resolves(name, arg):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg)
  resolved = resolve.resolve(config, IMAGENET_TRAIN)
  assert resolved.model.name
  assert resolved.steps.total >= 1
  if arg and 'local' in arg:
    assert resolved.data.name == 'digits'


def test_unknown_config_arg_is_an_error():
  module = importlib.import_module('configs.nfnet')
  with pytest.raises(ValueError, match='locla'):
    module.get_config('F0,locla')


def _flag_values(argv):
  """experiment.py's and the sweep's flags, for the command line `argv`."""
  values = flags.FlagValues()
  # The overrides (--config.x=y) are read from sys_argv, as from sys.argv.
  config_flags.DEFINE_config_file(
      'config',
      None,
      'config',
      flag_values=values,
      lock_config=True,
      sys_argv=['prog'] + argv,
  )
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=values)
  flags.DEFINE_string('sweep', None, 'sweep', flag_values=values)
  flags.DEFINE_bool('dry_run', False, 'dry run', flag_values=values)
  flags.DEFINE_integer('average_best', 0, 'seeds', flag_values=values)
  return values


def _parse(argv):
  """Parses an experiment command line the way experiment.py does."""
  values = _flag_values(argv)
  values(['prog'] + argv)
  return values


def _docstring_commands(name):
  module = importlib.import_module(f'configs.{name}')
  text = module.__doc__.replace('\\\n', ' ')
  return re.findall(r'python (?:experiment\.py|-m nfnets\.sweep) (.*)', text)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_docstring_commands_parse(name, monkeypatch):
  commands = _docstring_commands(name)
  assert commands, f'configs/{name}.py gives no command in its docstring'
  monkeypatch.chdir(REPO)
  for command in commands:
    values = _parse(command.split())
    resolve.resolve(values.config)
    if values.sweep:
      path = command.split('--config=')[1].split()[0].split(':')[0]
      assert values.sweep in sweep.sweep_names(path)
      runs = sweep.plan_runs(
          values.config, sweep.load_sweep(path, values.sweep), '/nonexistent'
      )
      sweep.check_average_best(runs, values.average_best)


def test_overriding_variant_and_batch_updates_derived_values(monkeypatch):
  monkeypatch.chdir(REPO)
  base = resolve.resolve(
      _parse(['--config=configs/nfnet.py:F0']).config, IMAGENET_TRAIN
  )
  assert (base.data.train_image_size, base.data.eval_image_size) == (192, 256)
  assert base.model.drop_rate == 0.2
  assert base.data.randaugment_magnitude == 5
  assert base.optimizer.agc.clipping == 0.01
  assert base.steps.total == 112_602

  config = _parse(
      [
          '--config=configs/nfnet.py:F0',
          '--config.model.variant=F3',
          '--config.train.batch_size=1024',
      ]
  ).config
  resolved = resolve.resolve(config, IMAGENET_TRAIN)
  assert resolved.model.name == 'nfnet_f3'
  assert (resolved.data.train_image_size, resolved.data.eval_image_size) == (
      320,
      416,
  )
  assert resolved.model.drop_rate == 0.4
  assert resolved.data.randaugment_magnitude == 15
  assert resolved.optimizer.agc.clipping == 0.01
  assert resolved.steps.total == 360 * IMAGENET_TRAIN // 1024
  lr_fn = optim.create_learning_rate_fn(
      resolved.optimizer.base_lr,
      resolved.train.batch_size,
      resolved.steps.warmup,
      resolved.steps.total,
  )
  assert float(lr_fn(resolved.steps.warmup)) == pytest.approx(0.4)

  small = resolve.resolve(
      _parse(
          ['--config=configs/nfnet.py:F0', '--config.train.batch_size=256']
      ).config
  )
  assert small.optimizer.agc.clipping > 0.01


def test_command_line_numbers_and_none_for_auto_fields(monkeypatch):
  monkeypatch.chdir(REPO)
  config = _parse(
      [
          '--config=configs/nfnet.py:F0',
          '--config.optimizer.agc.clipping=0.03',
          '--config.data.train_image_size=160',
      ]
  ).config
  resolved = resolve.resolve(config)
  assert resolved.optimizer.agc.clipping == 0.03
  assert resolved.data.train_image_size == 160
  config = _parse(
      ['--config=configs/nfnet.py:F0', '--config.optimizer.agc.clipping=None']
  ).config
  assert resolve.resolve(config).optimizer.agc.clipping is None
  config = _parse(
      ['--config=configs/nfnet.py:F0', '--config.data.train_image_size=big']
  ).config
  with pytest.raises(ValueError, match='data.train_image_size'):
    resolve.resolve(config)


# Every field whose default is None: a command-line value for it, and what the
# config then holds. A new None field must be added here (the test says so).
_UNSET_FIELDS = {
    'train.max_steps': ('8', 8),
    'eval.checkpoint': ('F0_haiku.npz', 'F0_haiku.npz'),
    'train.init_checkpoint': ('workdirs/f0', 'workdirs/f0'),
    'train.init_exclude': ('linear/', 'linear/'),
    'data.data_dir': ('gs://bucket/tfds', 'gs://bucket/tfds'),
    'optimizer.agc.clipping': ('auto', 'auto'),  # the BN / Fixup baselines
    'model.overrides.widths': ('(16,32,64,64)', (16, 32, 64, 64)),  # NFNets
    'model.overrides.depth': ('(1,1,1,1)', (1, 1, 1, 1)),  # ResNets
}


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_field_left_none_can_be_set_on_the_command_line(
    name, monkeypatch
):
  monkeypatch.chdir(REPO)
  config_arg = f'--config=configs/{name}.py'
  unset = [
      key
      for key, value in _leaves(_parse([config_arg]).config)
      if value is None
  ]
  assert unset, 'train.max_steps, at least, defaults to None'
  unlisted = sorted(set(unset) - set(_UNSET_FIELDS))
  assert not unlisted, f'add {unlisted} to _UNSET_FIELDS'
  for key in unset:
    text, expected = _UNSET_FIELDS[key]
    leaves = dict(
        _leaves(_parse([config_arg, f'--config.{key}={text}']).config)
    )
    assert leaves[key] == expected, key


@pytest.mark.parametrize(
    'field,value',
    [
        ('train.num_epochs', 0),
        ('train.label_smoothing', 1.0),
        ('train.eval_every_epochs', -1),
        ('train.log_every_steps', 0),
        ('train.checkpoint_every_steps', 0),
        ('train.keep_checkpoints', 0),
        ('optimizer.warmup_epochs', -1),
        ('optimizer.ema_decay', 1.5),
        ('model.stochdepth_rate', 1.0),
        ('data.randaugment_layers', -1),
        ('data.randaugment_magnitude', -5),
        ('optimizer.base_lr', 0.0),
        ('optimizer.weight_decay', -1e-5),
        ('model.drop_rate', 1.5),
        ('model.overrides.width', 0.0),
        ('train.loss_scale_init', 0.5),
        ('train.loss_scale_init', 1e39),  # inf in float32
        ('train.loss_scale_period', 0),
    ],
)
def test_out_of_range_values_are_errors_naming_the_field(field, value):
  config = importlib.import_module('configs.nfnet').get_config('F0')
  *groups, key = field.split('.')
  group = config
  for name in groups:
    group = group[name]
  group[key] = value
  with pytest.raises(ValueError, match=re.escape(f'{field} must be')):
    resolve.resolve(config)


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('model.variant', 'F9', "model.variant: .*'F9'.*'F0+'"),
        ('model.family', 'nfnett', "model.family: .*'nfnett'.*'nf_resnet'"),
        ('optimizer.name', 'rmsprop', "optimizer.name must be .*'rmsprop'"),
        ('optimizer.schedule', 'step', "optimizer.schedule must be .*'step'"),
    ],
)
def test_unknown_names_are_errors_naming_the_field(field, value, message):
  config = importlib.import_module('configs.nfnet').get_config('F0')
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=message.replace('+', r'\+')):
    resolve.resolve(config)


def test_demo_width_takes_a_fraction_on_the_command_line(monkeypatch):
  monkeypatch.chdir(REPO)
  argv = ['--config=configs/default.py', '--config.model.overrides.width=0.5']
  assert _parse(argv).config.model.overrides.width == 0.5


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_durations_in_epochs_take_fractions_on_the_command_line(
    name, monkeypatch
):
  monkeypatch.chdir(REPO)
  fields = ('train.num_epochs', 'train.eval_every_epochs')
  fields += ('optimizer.warmup_epochs',)
  argv = [f'--config=configs/{name}.py']
  argv += [f'--config.{field}=0.5' for field in fields]
  config = _parse(argv).config
  for field in fields:
    section, key = field.split('.')
    assert config[section][key] == 0.5, field


def test_auto_clipping_is_001_at_batch_4096():
  config = importlib.import_module('configs.nfnet').get_config('F0')
  assert config.train.batch_size == 4096
  assert config.optimizer.agc.clipping == 'auto'
  assert resolve.resolve(config).optimizer.agc.clipping == 0.01


def test_auto_augment_on_is_host_on_cpu_and_device_on_accelerators(
    monkeypatch,
):
  config = importlib.import_module('configs.nfnet').get_config('F0')
  assert config.data.augment_on == 'auto'
  assert resolve.resolve(config).data.augment_on == 'host'  # CPU here
  monkeypatch.setattr(resolve.jax, 'default_backend', lambda: 'gpu')
  assert resolve.resolve(config).data.augment_on == 'device'
  config.data.augment_on = 'host'  # an explicit choice is kept
  assert resolve.resolve(config).data.augment_on == 'host'


def test_auto_kernel_layout_is_ohwi_on_gpus_only_and_bad_values_fail(
    monkeypatch,
):
  config = importlib.import_module('configs.nfnet').get_config('F0')
  assert config.train.kernel_layout == 'auto'
  assert resolve.resolve(config).train.kernel_layout == 'hwio'  # CPU here
  monkeypatch.setattr(resolve.jax, 'default_backend', lambda: 'gpu')
  assert resolve.resolve(config).train.kernel_layout == 'ohwi'
  config.train.kernel_layout = 'hwio'  # an explicit choice is kept
  assert resolve.resolve(config).train.kernel_layout == 'hwio'
  config.train.kernel_layout = 'oihw'
  with pytest.raises(ValueError, match='train.kernel_layout'):
    resolve.resolve(config)


def test_agc_batch_sweep_dry_run_lists_the_whole_grid(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'nfnets.sweep',
          '--config=configs/nf_resnet.py:50',
          '--sweep=agc_batch',
          '--dry_run',
          f'--workdir_root={tmp_path}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  for batch in (256, 512, 1024, 2048, 4096):
    for clipping in ('0.01', '0.02', '0.04', '0.08', '0.16', 'None'):
      assert re.search(
          rf'batch_size={batch},clipping={clipping}\b', result.stdout
      ), (batch, clipping)
  assert '30' in result.stdout


def test_tiny_sweep_runs_end_to_end_and_writes_the_summary(tmp_path):
  env = dict(os.environ)
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'nfnets.sweep',
          '--config=configs/nf_resnet.py:50,local',
          '--sweep=agc_on_off',
          '--config.train.max_steps=3',
          '--config.train.batch_size=64',
          f'--workdir_root={tmp_path}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = tmp_path / 'agc_on_off' / 'summary.csv'
  assert summary.exists()
  rows = summary.read_text().strip().splitlines()
  assert len(rows) == 3  # header + 2 runs
  assert all('done' in row for row in rows[1:]), rows
  assert (tmp_path / 'agc_on_off' / 'summary.md').exists()


def _cli_error(argv):
  """The message `cli.parse_flags` exits with for an experiment command line."""
  values = _flag_values(argv)
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(['prog'] + argv, flag_values=values, prefix='prog: ')
  message = exit_info.value.code
  assert isinstance(message, str) and '\n' not in message, message
  assert message.startswith('prog: error: ')
  return message


@pytest.mark.parametrize(
    'argv,expected',
    [
        (
            ['--config=configs/default.py', '--config.train.batchsize=8'],
            [
                '--config.train.batchsize=8',
                "train has no field 'batchsize' (fields: batch_size, ",
                "; did you mean 'batch_size'?",
            ],
        ),
        (
            ['--config=configs/nfnet.py:F0', '--config.trian.batch_size=8'],
            ["the config has no field 'trian'", "did you mean 'train'?"],
        ),
        (
            ['--config=configs/default.py', '--config.train.zzz=1'],
            ["train has no field 'zzz' (fields: batch_size, "],
        ),
        (
            ['--config=configs/default.py', '--config.train.batch_size.x=1'],
            [
                'train.batch_size is 64, not a ConfigDict, so it has no field'
                " 'x'"
            ],
        ),
        (
            ['--config=configs/default.py', '--config.train.batch_size=abc'],
            [
                '--config.train.batch_size=abc',
                'invalid literal for int()',
                'train.batch_size holds int values here (64)',
            ],
        ),
        (
            [
                '--config=configs/default.py',
                '--config.optimizer.agc.clipping=none',
            ],
            [
                'optimizer.agc.clipping holds float values here (0.04)',
                'cannot make a number field None (0 turns AGC off)',
            ],
        ),
        (
            ['--config=configs/nope.py'],
            ['--config=configs/nope.py: [Errno 2] No such file or directory'],
        ),
        (
            ['--config=configs/nfnet.py:F99'],
            ["ValueError: Unknown config arg ['F99']"],
        ),
    ],
)
def test_command_line_mistakes_end_in_one_line_naming_the_flag(
    argv, expected, monkeypatch
):
  monkeypatch.chdir(REPO)
  message = _cli_error(argv)
  for part in expected:
    assert part in message, message


def test_parse_flags_passes_a_good_command_line_through(monkeypatch):
  monkeypatch.chdir(REPO)
  argv = ['--config=configs/default.py', '--config.train.batch_size=8']
  values = _flag_values(argv)
  assert cli.parse_flags(['prog'] + argv, flag_values=values) == ['prog']
  assert values.config.train.batch_size == 8


@pytest.mark.parametrize(
    'program',
    [
        ['experiment.py', '--workdir=unused'],
        ['-m', 'nfnets.sweep', '--sweep=x'],
    ],
)
def test_programs_print_one_line_for_a_mistyped_override(program):
  result = subprocess.run(
      [sys.executable, *program, '--config=configs/default.py']
      + ['--config.optimizer.lr=0.1'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 1
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "--config.optimizer.lr=0.1: optimizer has no field 'lr'" in lines[0]


def test_the_demo_config_refuses_an_argument_it_would_ignore():
  from configs import default  # pylint: disable=g-import-not-at-top

  assert (
      default.get_config().model.variant == default.get_config('').model.variant
  )
  with pytest.raises(ValueError, match=r"takes no argument, got 'F3'"):
    default.get_config('F3')
