"""Config files, command-line overrides and main.py's handling of bad input."""
import ast
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

import datasets
import models
import sampling
from configs import read_config_json
from tests.conftest import REPO_ROOT

CIFAR10 = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'cifar10_rf_gaussian_ddpmpp.py')
DIGITS = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'digits_rf_gaussian_ddpmpp_demo.py')


def parse_config(argv):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_published_cifar10_values():
  config = parse_config(['prog', f'--config={CIFAR10}'])
  assert config.training.batch_size == 128 and config.training.snapshot_freq == 100000
  assert config.model.nf == 128 and tuple(config.model.ch_mult) == (1, 2, 2, 2)
  assert config.model.num_res_blocks == 4 and tuple(config.model.attn_resolutions) == (16,)
  assert config.model.dropout == 0.15 and config.model.ema_rate == 0.999999
  assert config.model.embedding_type == 'positional' and config.model.resblock_type == 'biggan'
  assert config.optim.lr == 2e-4 and config.optim.warmup == 5000 and config.optim.grad_clip == 1.0
  assert config.data.centered and config.training.reduce_mean
  assert config.sampling.use_ode_sampler == 'rk45' and config.sampling.ode_tol == 1e-5


def test_overrides_apply():
  config = parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_size=8',
                         '--config.sampling.use_ode_sampler=euler', '--config.model.ch_mult=(1,2)'])
  assert config.training.batch_size == 8
  assert config.sampling.use_ode_sampler == 'euler'
  assert tuple(config.model.ch_mult) == (1, 2)


def test_unknown_override_key_is_an_error():
  with pytest.raises(Exception, match='batch_sise'):
    parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_sise=8'])


def test_override_of_the_wrong_type_is_an_error():
  with pytest.raises(Exception, match='batch_size'):
    parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_size=eight'])


def config_leaf_keys(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from config_leaf_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
COPIES = ('copy_and_resolve_references',)  # Calls that return (a copy of) the config they are called on.


def framework_sources():
  """{path: source} of every Python file of the framework outside configs/, tests/ and benchmarks/."""
  sources = {}
  for folder, _, files in os.walk(REPO_ROOT):
    relative = os.path.relpath(folder, REPO_ROOT)
    if relative.split(os.sep)[0] in ('configs', 'tests', 'benchmarks', '.git'):
      continue
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(folder, name), encoding='utf-8') as handle:
          sources[os.path.join(folder, name)] = handle.read()
  return sources


def scope_nodes(scope):
  """The nodes of one module or function body; a function defined inside it is yielded, but not its body."""
  pending = list(ast.iter_child_nodes(scope))
  while pending:
    node = pending.pop()
    yield node
    if not isinstance(node, SCOPES):
      pending.extend(ast.iter_child_nodes(node))


def constant_string(node):
  return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def config_path(node, names):
  """The key path (a tuple) of the config entry that ``node`` evaluates to, or None for anything else.

  ``config`` is the root (); ``names`` maps the scope's aliases to paths (``e = config.eval``: e -> ('eval',)).
  Follows ``.key``, ``['key']``, ``.get('key', ...)`` and ``getattr(..., 'key')``."""
  if isinstance(node, ast.Name):
    return names.get(node.id, () if node.id == 'config' else None)
  if isinstance(node, ast.Attribute):
    base = config_path(node.value, names)
    return None if base is None else base + (node.attr,)
  if isinstance(node, ast.Subscript):
    base, key = config_path(node.value, names), constant_string(node.slice)
    return None if base is None or key is None else base + (key,)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ('get',) + COPIES:
    base = config_path(node.func.value, names)
    if base is None or node.func.attr in COPIES:
      return base
    key = constant_string(node.args[0]) if node.args else None
    return None if key is None else base + (key,)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'getattr' and node.args:
    base, key = config_path(node.args[0], names), constant_string(node.args[1]) if len(node.args) > 1 else None
    return None if base is None or key is None else base + (key,)
  return None


def parameter_names(function):
  names = [arg.arg for arg in function.args.posonlyargs + function.args.args]
  return names[1:] if names[:1] in (['self'], ['cls']) else names


def config_paths_read(sources):
  """Every config key path (dotted, e.g. 'eval.batch_size') that the code of ``sources`` ({path: source}) reads.

  Aliases are resolved per function: ``e = config.eval``, ``training, data = config.training, config.data``, and a
  parameter of a function called with a config section (``check_cifar10_shape(config.data)``). A key counts as read
  only where its whole path is, so ``training.batch_size`` does not stand in for ``eval.batch_size``; assigning a
  key is no read of it."""
  trees = [(os.path.splitext(os.path.basename(path))[0], ast.parse(source, path)) for path, source in sources.items()]
  functions = {}  # (module name, function name) -> the functions of that name in that module, nested ones too
  for module, tree in trees:
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        functions.setdefault((module, node.name), []).append(node)

  def callees(call, module):
    """The functions a call may run: ``f(...)`` one of this module's, else any module's; ``m.f(...)`` module m's."""
    if isinstance(call.func, ast.Name):
      return functions.get((module, call.func.id)) or [function for (_, name), found in functions.items()
                                                       if name == call.func.id for function in found]
    if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
      owner = call.func.value.id
      return functions.get((owner, call.func.attr)) or functions.get((module, call.func.attr), []) * (
        owner in ('self', 'cls'))
    return []

  def visit(scope, outer, module, bound, reads, calls):
    """Adds the key paths that ``scope`` reads to ``reads``, and its calls' parameters given a config (section)
    to ``calls``; ``outer`` maps the enclosing scope's names to paths, ``bound`` the parameters known so far."""
    names = dict(outer)
    if isinstance(scope, SCOPES):
      for parameter in parameter_names(scope) + [arg.arg for arg in scope.args.kwonlyargs]:
        names.pop(parameter, None)
        if (scope, parameter) in bound:
          names[parameter] = bound[scope, parameter]
    nodes = list(scope_nodes(scope))
    for _ in range(3):  # Aliases of aliases, in any order.
      for node in nodes:
        if isinstance(node, ast.Assign):
          for target in node.targets:
            pairs = ([(target, node.value)] if not isinstance(target, ast.Tuple) else
                     zip(target.elts, node.value.elts) if isinstance(node.value, ast.Tuple) else [])
            for name, value in pairs:
              path = config_path(value, names)
              if isinstance(name, ast.Name) and path is not None:
                names[name.id] = path
    for node in nodes:
      if isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)) and not isinstance(
          getattr(node, 'ctx', ast.Load()), (ast.Store, ast.Del)):
        path = config_path(node, names)
        if path:
          reads.add('.'.join(path))
      if isinstance(node, ast.Call):
        for function in callees(node, module):
          arguments = list(zip(parameter_names(function), node.args)) + [(k.arg, k.value) for k in node.keywords]
          for parameter, argument in arguments:
            path = config_path(argument, names)
            if parameter is not None and path is not None:
              calls[function, parameter] = path
      if isinstance(node, SCOPES):
        visit(node, names, module, bound, reads, calls)

  bound = {}  # (function, parameter) -> the config path it is called with; grows until no call adds one.
  while True:
    reads, calls = set(), {}
    for module, tree in trees:
      visit(tree, {}, module, bound, reads, calls)
    if calls.keys() <= bound.keys():
      return frozenset(reads)
    bound.update(calls)


@functools.lru_cache(maxsize=None)
def framework_config_paths_read():
  return config_paths_read(framework_sources())


ALL_CONFIGS = sorted(os.path.join(REPO_ROOT, 'configs', 'rectified_flow', name)
                     for name in os.listdir(os.path.join(REPO_ROOT, 'configs', 'rectified_flow'))
                     if name.endswith('.py') and name != '__init__.py' and 'get_config' in
                     open(os.path.join(REPO_ROOT, 'configs', 'rectified_flow', name)).read())


def test_config_file_names_have_no_equals_sign():
  assert ALL_CONFIGS and not [path for path in ALL_CONFIGS if '=' in os.path.basename(path)]


@pytest.mark.parametrize('config_file', ALL_CONFIGS, ids=os.path.basename)
def test_every_config_key_is_read_by_the_code(config_file):
  config = parse_config(['prog', f'--config={config_file}'])
  read = framework_config_paths_read()
  unread = [key for key in config_leaf_keys(config) if key not in read]
  assert not unread, f'config keys that no code reads: {unread}'


ALIASED_READS = {
  'train.py': """
def train(config):
  training, data = config.training, config.data
  e = config.eval
  config.eval.batch_size = 3
  config_one_round = config.copy_and_resolve_references()
  r = config_one_round.reflow
  check_shape(config.model)
  return (training.batch_size + e.num_samples + config.sampling['sample_N'] + r.get('reflow_type')
          + getattr(config.optim, 'lr') + data.num_channels)


def check_shape(model):
  return model.image_size
""",
  'other.py': """
def check_size(model, training):
  return model.num_scales + training.n_iters


def run(config):
  check_size(config.data, config.training)
"""}


def test_config_key_reads_count_only_for_their_whole_path():
  read = config_paths_read(ALIASED_READS)
  assert {'training.batch_size', 'eval.num_samples', 'sampling.sample_N', 'reflow.reflow_type', 'optim.lr',
          'data.num_channels', 'model.image_size', 'data.num_scales', 'training.n_iters'} <= read
  # Written, or read on another section (or through a parameter never given that section): not read.
  assert not {'eval.batch_size', 'data.batch_size', 'model.num_scales', 'model.n_iters', 'data.image_size'} & read


def run_main(*args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'main.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def test_main_rejects_an_unknown_override_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=train', '--config.training.n_iter=3')
  assert result.returncode != 0
  assert 'n_iter' in result.stderr
  assert not workdir.exists()


def test_main_rejects_an_unknown_mode_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=sample')
  assert result.returncode != 0
  assert 'train' in result.stderr and 'eval' in result.stderr and 'reflow' in result.stderr
  assert not workdir.exists()


def test_main_requires_a_workdir():
  result = run_main(f'--config={DIGITS}', '--mode=train')
  assert result.returncode != 0
  assert 'workdir' in result.stderr


def test_eval_on_a_missing_workdir_is_a_clear_error(tmp_path):
  workdir = tmp_path / 'does_not_exist'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=eval')
  assert result.returncode != 0
  assert 'does not exist' in result.stderr
  assert not workdir.exists()


# Keys added to the defaults after configs and config.json files of earlier versions were written, each defaulting to
# the behaviour from before it existed.
KEYS_ADDED_LATER = ('model.num_classes', 'model.fused_norm', 'training.label_dropout', 'sampling.guidance_scale',
                    'sampling.guidance_t_min', 'sampling.guidance_t_max', 'sampling.precision',
                    'sampling.ode_state_dtype', 'reflow.teacher_guidance_scale', 'reflow.teacher_guidance_t_min',
                    'reflow.teacher_guidance_t_max', 'eval.labels', 'allow_pickle_checkpoints', 'model.time_inputs',
                    'reflow.u_shaped_a', 'model.dit_size', 'model.patch_size', 'model.dit_depth',
                    'model.dit_hidden_size', 'model.dit_num_heads')


def without_keys(tree, keys):
  for key in keys:
    *sections, name = key.split('.')
    node = tree
    for section in sections:
      node = node[section]
    del node[name]
  return tree


def test_an_old_config_json_reads_with_the_defaults_of_the_keys_it_lacks(tmp_path):
  """A config.json written before later keys existed reads as the full config (each missing key at its default),
  and the code that reads those keys runs on it as on the full config."""
  full = parse_config(['prog', f'--config={DIGITS}'])
  old = without_keys(json.loads(full.to_json_best_effort()), KEYS_ADDED_LATER)
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(old))
  config = read_config_json(path)
  assert json.loads(config.to_json_best_effort()) == json.loads(full.to_json_best_effort())
  assert sampling.sampler_settings(config) == sampling.sampler_settings(full)
  assert models.num_classes(config) == 0 and not datasets.wants_labels(config)
  assert models.model_config_summary(config) == models.model_config_summary(full)


def test_main_fills_in_the_keys_an_old_config_file_lacks(tmp_path):
  """main.py runs a config file written before later keys existed: the resolved config.json holds every key, at
  its default."""
  old_file = tmp_path / 'old_digits.py'
  old_file.write_text(textwrap.dedent(f'''
      from tests.helpers import tiny_digits_config

      def get_config():
        config = tiny_digits_config(n_iters=1, snapshot_freq=1, snapshot_freq_for_preemption=1)
        for key in {KEYS_ADDED_LATER!r}:
          *sections, name = key.split('.')
          node = config
          for section in sections:
            node = node[section]
          del node[name]
        return config
      '''))
  workdir = tmp_path / 'run'
  result = run_main(f'--config={old_file}', f'--workdir={workdir}', '--mode=train', cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  written = json.loads((workdir / 'config.json').read_text())
  defaults = json.loads(parse_config(['prog', f'--config={DIGITS}']).to_json_best_effort())
  for key in KEYS_ADDED_LATER:
    *sections, name = key.split('.')
    mine, default = written, defaults
    for section in sections:
      mine, default = mine[section], default[section]
    assert mine[name] == default[name], key
  assert (workdir / 'checkpoints' / 'checkpoint_1.pth').is_file()
