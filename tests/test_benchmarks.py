"""Smoke tests that keep the benchmarks alive (speed goals live in them)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'benchmarks',
    ),
)

import hlo_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_train_throughput_prints_json_lines(capsys):
  # One mode keeps this quick; the full step is the runner's, tested there.
  train_throughput.main(
      ['--steps=2', '--warmup=0', '--batch=8', '--modes=minimal']
  )
  lines = [
      json.loads(l)
      for l in capsys.readouterr().out.splitlines()
      if l.startswith('{')
  ]
  modes = {l['mode']: l for l in lines if 'mode' in l}
  assert set(modes) == {'minimal'}
  for record in modes.values():
    assert record['images_per_s'] > 0 and record['step_ms'] > 0
    assert record['devices'] == 8
    # conftest's XLA_FLAGS (8 CPU devices), as every measurement records.
    assert '--xla_force_host_platform_device_count=8' in record['xla_flags']
    # XLA's planned memory is reported on every backend, the CPU included.
    assert record['xla_temp_gib'] > 0 and record['xla_args_gib'] > 0


def test_train_throughput_rejects_an_unknown_mode():
  with pytest.raises(ValueError, match='full_step'):
    train_throughput.build_step('nfnet_tiny', 8, 32, 'float32', 'fast')
  with pytest.raises(SystemExit):
    train_throughput.main(['--modes=minimal,fast'])


@pytest.mark.parametrize('modes', ['', ','])
def test_train_throughput_refuses_modes_that_name_none(modes, capsys):
  # It used to measure nothing and exit 0.
  with pytest.raises(SystemExit):
    train_throughput.main([f'--modes={modes}'])
  assert 'names no mode' in capsys.readouterr().err


@pytest.mark.parametrize(
    'main,flag',
    [
        (train_throughput.main, '--batch=0'),
        (train_throughput.main, '--image_size=0'),
        (train_throughput.main, '--thesis_batch=-8'),
        (profile_step.main, '--batch=0'),
        (profile_step.main, '--image_size=-1'),
    ],
)
def test_benchmarks_reject_sizes_below_one(main, flag, capsys):
  # 0 used to fall back to the default silently (`args.batch or default`).
  with pytest.raises(SystemExit):
    main([flag])
  assert f'{flag.split("=")[0]} must be >= 1' in capsys.readouterr().err


def test_train_throughput_rejects_an_unknown_model_in_one_line(capsys):
  with pytest.raises(SystemExit):
    train_throughput.main(['--model=nfnet_f9'])
  assert "--model: Unknown model name 'nfnet_f9'" in capsys.readouterr().err


@pytest.mark.parametrize('donate', [True, False])
def test_train_throughput_donates_the_state_unless_told_not_to(donate):
  step_fn, state, batch, *_ = train_throughput.build_step(
      'nfnet_tiny', 8, 32, 'float32', 'minimal', donate=donate
  )
  text = step_fn.lower(state, batch).as_text()
  # Donated arguments are marked in the lowered module for XLA to alias.
  marked = 'tf.aliasing_output' in text or 'jax.buffer_donor' in text
  assert marked == donate


def test_train_throughput_keeps_kernels_as_told():
  shapes = {}
  for layout in ('auto', 'hwio', 'ohwi'):
    _, state, *_ = train_throughput.build_step(
        'nfnet_tiny', 8, 32, 'float32', 'minimal', kernel_layout=layout
    )
    kernel = state.params['NFNet/~/stem_conv0']['w']
    shapes[layout] = kernel.shape[1:]  # after the device axis
  h, w, i, o = shapes['hwio']
  assert shapes['ohwi'] == (o, h, w, i) != shapes['hwio']
  assert shapes['auto'] == shapes['hwio']  # on a CPU, as the runner there
  with pytest.raises(ValueError, match='kernel_layout'):
    train_throughput.build_step(
        'nfnet_tiny', 8, 32, 'float32', 'minimal', kernel_layout='nchw'
    )


_GPU_HLO = """
ENTRY %main {
  %cudnn-conv-bias-activation.3 = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convBiasActivationForward", metadata={op_name="jit(f)/jvp(NFNet)/conv0/conv_general_dilated"}
  %cudnn-conv-bw-filter.1 = (bf16[3,3,16,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %c), custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(f)/transpose(jvp(NFNet))/conv0/conv_general_dilated"}
  %cudnn-conv-bw-input.2 = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%c, %b), custom_call_target="__cudnn$convBackwardInput"
  %loop_add_fusion.7 = bf16[8,4,4,16]{3,2,1,0} fusion(%a, %c), kind=kLoop, calls=%fused_add.7, metadata={op_name="jit(f)/jvp(NFNet)/add"}
  %input_reduce_fusion = f32[16]{0} fusion(%a), kind=kInput, calls=%fused_reduce
  ROOT %all-reduce = (f32[16]{0}, /*index=1*/f32[3,3,16,16]{3,2,1,0}) all-reduce(%x, %y), replica_groups={}, to_apply=%add
}
"""


def test_profile_step_attributes_gpu_kernels_to_hlo_kinds():
  hlo = profile_step.parse_hlo(_GPU_HLO)
  assert hlo['cudnn-conv-bias-activation.3'][0] == 'conv_forward'
  assert hlo['cudnn-conv-bw-filter.1'] == (
      'conv_backward_filter',
      'jit(f)/transpose(jvp(NFNet))/conv0/conv_general_dilated',
  )
  assert hlo['cudnn-conv-bw-input.2'][0] == 'conv_backward_input'
  assert hlo['loop_add_fusion.7'][0] == 'elementwise_fusion'
  assert hlo['input_reduce_fusion'][0] == 'reduction_fusion'
  assert hlo['all-reduce'][0] == 'collective'

  meta = lambda pid, tid, kind, name: dict(
      ph='M', pid=pid, tid=tid, name=kind, args=dict(name=name)
  )
  kernel = lambda ts, dur, name, op, module='jit_step': dict(
      ph='X',
      pid=1,
      tid=7,
      ts=ts,
      dur=dur,
      name=name,
      args=dict(hlo_op=op, hlo_module=module),
  )
  trace = dict(
      traceEvents=[
          meta(1, 0, 'process_name', '/device:GPU:0'),
          meta(1, 7, 'thread_name', 'Stream #7(Compute)'),
          meta(1, 9, 'thread_name', 'XLA Ops'),
          kernel(0, 10, 'sm90_xmma_fprop', 'cudnn-conv-bias-activation.3'),
          # Inside a CUDA graph: tagged with the thunk, named by the fusion.
          kernel(5, 10, 'loop_add_fusion_7', 'command_buffer_12'),
          kernel(30, 4, 'input_reduce_fusion', 'input_reduce_fusion'),
          # Another module (a metric read): not the train step's time.
          kernel(40, 1, 'copy', 'copy.1', module='jit_other'),
          # The derived per-op line repeats the kernels; not counted twice.
          dict(ph='X', pid=1, tid=9, ts=0, dur=34, name='fusion', args={}),
      ]
  )
  events = profile_step.kernel_events(trace)
  assert len(events) == 3
  summary, rows = profile_step.summarize(events, hlo, steps=1, top=2)
  assert summary['kernel_ms_per_step'] == 0.024
  # Busy time is the union of the (overlapping) kernel intervals.
  assert summary['device_busy_ms_per_step'] == 0.019
  # The 4 us reduction is the one kernel under SMALL_KERNEL_US.
  assert summary['small_kernels_per_step'] == 1
  assert summary['small_kernels_ms_per_step'] == 0.004
  assert summary['categories_ms_per_step'] == {
      'conv_forward': 0.01,
      'elementwise_fusion': 0.01,
      'reduction_fusion': 0.004,
  }
  assert [r['hlo_op'] for r in rows] == [
      'cudnn-conv-bias-activation.3',
      'loop_add_fusion.7',
  ]
  # With the instructions' bytes: 10 kB in 10 us is 1 GB/s.
  _, rows = profile_step.summarize(
      events, hlo, steps=1, top=2, sizes={'loop_add_fusion.7': 10_000}
  )
  assert [r['gb_per_s'] for r in rows] == [None, 1.0]


def test_profile_step_counts_the_bytes_an_instruction_moves():
  sizes = profile_step.instruction_bytes("""
ENTRY %e (p: bf16[8,16], q: f32[16]) -> bf16[8,16] {
  %p = bf16[8,16]{1,0} parameter(0)
  %q = f32[16]{0} parameter(1)
  %t = (bf16[8,16]{1,0}, f32[16]{0}) fusion(%p, %q), kind=kLoop, calls=%g
  ROOT %f = bf16[8,16]{1,0} get-tuple-element(%t), index=0
}
""")
  assert sizes['p'] == 256 and sizes['q'] == 64
  assert sizes['t'] == (256 + 64) + (256 + 64)  # its outputs and operands
  assert sizes['f'] == 256 + (256 + 64)


def test_profile_step_prints_a_summary_and_the_top_ops(capsys):
  profile_step.main(['--steps=1', '--timed_steps=1', '--top=3'])
  lines = [
      json.loads(l)
      for l in capsys.readouterr().out.splitlines()
      if l.startswith('{')
  ]
  summary = [l for l in lines if l['kind'] == 'summary']
  top = [l for l in lines if l['kind'] == 'top']
  assert len(summary) == 1 and len(top) == 3
  assert summary[0]['kernel_ms_per_step'] > 0 and summary[0]['step_ms'] > 0
  # The ops are the train step's HLO instructions, most of them mapped back
  # to a kind (conv, fusion, ...).
  assert sum(summary[0]['categories_ms_per_step'].values()) == pytest.approx(
      summary[0]['kernel_ms_per_step'], abs=0.01
  )
  assert top[0]['ms_per_step'] >= top[-1]['ms_per_step']


_SCHEDULED_HLO = """
HloModule m, is_scheduled=true

%f (x: f32[4]) -> f32[1000] {
  ROOT %x = f32[4]{0} parameter(0)
}

ENTRY %main (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %a = f32[1000]{0} fusion(%p0), kind=kLoop, calls=%f, metadata={op_name="jit(f)/jvp(M)/nf_block_3/mul"}
  %t = (bf16[2000]{0}, u8[16]{0}) custom-call(%a), custom_call_target="__cudnn$convForward"
  %b = bf16[2000]{0} get-tuple-element(%t), index=0
  %w = (f32[8]{0}, u8[0]{0}) custom-call(%p0, %b), custom_call_target="__cudnn$convBackwardFilter"
  %c = f32[500]{0} fusion(%b, %a), kind=kLoop, calls=%f
  ROOT %d = f32[4]{0} fusion(%c), kind=kLoop, calls=%f
}
"""


def test_hlo_memory_replays_live_buffers_in_schedule_order():
  records = hlo_memory.analyse(_SCHEDULED_HLO, top=5)
  summary = records[0]
  # At %c: a (4,000 B), t (4,000 + 16, through b) and c (2,000) are live;
  # w (32 B) died after its definition, the parameter is not counted.
  assert summary['peak_bytes'] == 10_016
  assert summary['peak_at'] == 'c'
  assert summary['weight_gradient_convs'] == 1
  assert summary['convs_waited_median'] == 0  # right after its gradient
  live = {(r['scope'], r['shape']) for r in records[1:]}
  assert ('jvp(M)/nf_block_N/mul', 'f32[1000]') in live
  with pytest.raises(ValueError, match='ENTRY'):
    hlo_memory.analyse('HloModule m')


def test_hlo_memory_reads_a_compiled_step(tmp_path, capsys):
  f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) * 2.0))
  text = f.lower(jnp.ones((64, 64))).compile().as_text()
  path = tmp_path / 'hlo.txt'
  path.write_text(text)
  hlo_memory.main([str(path), '--top=3'])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert lines[0]['kind'] == 'summary' and lines[0]['peak_gb'] >= 0
  assert 1 <= len(lines) <= 4


def test_gpu_session_script_parses_and_rejects_an_unknown_mode(tmp_path):
  # A broken script would waste a lent GPU's 15 minutes; its modes run only
  # there (or for minutes on a CPU), so at least its syntax and usage are
  # checked here.
  import subprocess  # pylint: disable=g-import-not-at-top

  script = os.path.join(
      os.path.dirname(__file__), '..', 'benchmarks', 'gpu_session.sh'
  )
  assert subprocess.run(['bash', '-n', script], check=False).returncode == 0
  result = subprocess.run(
      ['bash', script, 'everything'],
      env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode == 2
  assert 'usage:' in result.stderr and 'round' in result.stderr
  assert not os.listdir(tmp_path)  # refused before it installs or writes


def test_gpu_session_prep_refuses_a_base_that_is_not_a_commit():
  # `prep` fetches wheels and rewrites .base: a wrong BASE must stop it
  # before either, with the field named.
  import subprocess  # pylint: disable=g-import-not-at-top

  root = os.path.join(os.path.dirname(__file__), '..')
  before = os.path.exists(os.path.join(root, '.base'))
  result = subprocess.run(
      ['bash', os.path.join(root, 'benchmarks', 'gpu_session.sh'), 'prep'],
      env=dict(os.environ, BASE='not-a-commit-0000'),
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert result.returncode == 1
  assert 'BASE=not-a-commit-0000 is not a commit' in result.stderr
  assert os.path.exists(os.path.join(root, '.base')) == before


def test_full_modes_time_the_log_step_in_the_runners_proportion():
  record = train_throughput.time_ours(
      'nfnet_tiny', 8, 16, 'float32', 'full_step', steps=2, warmup=0
  )
  every = record['log_every_steps']
  assert every == 100  # configs/common.py's, as the runner's
  quiet, log = record['quiet_step_ms'], record['log_step_ms']
  assert quiet > 0 and log > 0
  average = ((every - 1) * quiet + log) / every
  assert record['step_ms'] == pytest.approx(average, abs=2e-3)
  # The record rounds images/s to 0.1: a slow step's 26.47 is printed 26.5.
  assert record['images_per_s'] == pytest.approx(
      8000 / record['step_ms'], rel=1e-3, abs=0.05
  )


def test_only_the_log_step_computes_the_logged_norms():
  config = train_throughput._config('nfnet_tiny', 8, 16, 'float32')
  _, state, batch, *_ = train_throughput.build_step(
      'nfnet_tiny', 8, 16, 'float32', 'full_step'
  )
  keys = {}
  for logs in (False, True):
    step_fn = train_throughput.make_step(config, 'full_step', with_metrics=logs)
    keys[logs] = set(jax.eval_shape(step_fn[0], state, batch)[1])
  assert keys[True] - keys[False] == {
      'param_norm',
      'update_norm',
      'agc_clipped_fraction',
  }
  with pytest.raises(ValueError, match='minimal'):
    train_throughput.make_step(config, 'minimal', with_metrics=True)
