"""Every command quoted in README.md and docs/*.md is real, and every relative link points to a file.

Commands come from shell code blocks (backslash continuations joined; ``R=...`` assignments of the block expanded)
and from inline code spans that start with a command. ``main.py`` commands (also under torchrun) are checked
against main.py's own flag definitions and the config file's ``get_config()``; scripts against their argparse
flags; ``make`` against the Makefile's targets; ``pip install -r`` against the requirements files.
"""
import ast
import functools
import importlib.util
import os
import re
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # Config files import ``configs.``, as under main.py.

MAX_README_LINES = 250
COMMANDS = ('python', 'python3', 'torchrun', 'make', 'pip')
SHELL_LANGUAGES = ('', 'bash', 'sh', 'shell', 'console')
FENCE = re.compile(r'^\s*```\s*([\w+-]*)')
ASSIGNMENT = re.compile(r'^([A-Za-z_]\w*)=(\S+)\s*(#.*)?$')
VARIABLE = re.compile(r'\$\{(\w+)\}|\$(\w+)')
INLINE_CODE = re.compile(r'(?<!`)`([^`]+)`(?!`)')
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def doc_files():
  docs = os.path.join(ROOT, 'docs')
  names = sorted(name for name in os.listdir(docs) if name.endswith('.md')) if os.path.isdir(docs) else []
  return ['README.md'] + [os.path.join('docs', name) for name in names]


def split_markdown(relpath):
  """(code blocks as (language, [(line number, line)]), prose with code blocks blanked, line numbers kept)."""
  with open(os.path.join(ROOT, relpath), encoding='utf-8') as f:
    lines = f.read().split('\n')
  blocks, prose, block = [], [], None
  for number, line in enumerate(lines, 1):
    fence = FENCE.match(line)
    if block is None and fence:
      block = (fence.group(1).lower(), [])
      prose.append('')
    elif block is not None and line.strip().startswith('```'):
      blocks.append(block)
      block = None
      prose.append('')
    elif block is not None:
      block[1].append((number, line))
      prose.append('')
    else:
      prose.append(line)
  return blocks, '\n'.join(prose)


def is_command(text):
  words = text.split()
  return bool(words) and words[0] in COMMANDS


def block_commands(lines):
  """Commands of one shell block as (line number, text), continuations joined, the block's variables expanded."""
  commands, variables, pending, start = [], {}, '', None
  for number, line in lines:
    if start is None:
      start = number
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    text, pending = (pending + line).strip(), ''
    first, start = start, None
    assignment = ASSIGNMENT.match(text)
    if assignment:
      variables[assignment.group(1)] = assignment.group(2)
    elif is_command(text):
      commands.append((first, expand(text, variables)))
  return commands


def expand(text, variables):
  def value(match):
    name = match.group(1) or match.group(2)
    return variables.get(name, match.group(0))  # An undefined variable stays and fails the check that reads it.
  return VARIABLE.sub(value, text)


def line_of(text, offset):
  return text.count('\n', 0, offset) + 1


@functools.cache
def all_commands():
  found = []
  for relpath in doc_files():
    blocks, prose = split_markdown(relpath)
    for language, lines in blocks:
      if language in SHELL_LANGUAGES:
        found += [(relpath, number, command) for number, command in block_commands(lines)]
    for match in INLINE_CODE.finditer(prose):
      text = ' '.join(match.group(1).split())
      if is_command(text) and len(text.split()) > 1:  # A lone `torchrun` in prose names the program only.
        found.append((relpath, line_of(prose, match.start()), text))
  return found


@functools.cache
def all_links():
  found = []
  for relpath in doc_files():
    _, prose = split_markdown(relpath)
    found += [(relpath, line_of(prose, m.start()), m.group(1)) for m in LINK.finditer(prose)]
  return found


@functools.cache
def main_flags():
  """main.py's flags as {name: is_bool}, its modes, its required flags and the name of its config-file flag."""
  with open(os.path.join(ROOT, 'main.py'), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  defined, modes, required, config_flag = {}, [], [], None
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    kind = node.func.attr
    if kind.startswith('DEFINE') and node.args and isinstance(node.args[0], ast.Constant):
      name = node.args[0].value
      defined[name] = kind in ('DEFINE_bool', 'DEFINE_boolean')
      if kind == 'DEFINE_config_file':
        config_flag = name
      if name == 'mode' and kind == 'DEFINE_enum':
        modes = list(ast.literal_eval(node.args[2]))
    elif kind == 'mark_flags_as_required':
      required = list(ast.literal_eval(node.args[0]))
  return defined, modes, required, config_flag


@functools.cache
def load_config(path):
  spec = importlib.util.spec_from_file_location(f'docs_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def has_key(config, dotted):
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def parse_overrides(config_path, overrides):
  """Parses the overrides as main.py does (ml_collections config_flags, locked config): types and values too."""
  argv = ['main.py', f'--config={config_path}'] + [f'--config.{key}={value}' for key, value in overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)


def check_main(args):
  """args: the tokens after main.py."""
  defined, modes, required, config_flag = main_flags()
  values, overrides, problems = {}, [], []
  i = 0
  while i < len(args):
    token = args[i]
    i += 1
    if not token.startswith('--'):
      problems.append(f'unexpected argument {token!r} (main.py takes flags only)')
      continue
    name, has_value, value = token[2:].partition('=')
    if config_flag and name.startswith(config_flag + '.'):
      if not has_value:
        value, i = (args[i], i + 1) if i < len(args) else ('', i)
      overrides.append((name[len(config_flag) + 1:], value))
      continue
    is_bool = defined.get(name)
    if is_bool is None and name.startswith('no') and defined.get(name[2:]):
      continue  # absl's --noflag of a boolean flag.
    if is_bool is None:
      problems.append(f'--{name} is not a flag of main.py (it defines {", ".join(sorted(defined))})')
      continue
    if not has_value and not is_bool:
      value, i = (args[i], i + 1) if i < len(args) else ('', i)
    values[name] = value
  problems += [f'--{name} is required by main.py and missing' for name in required if name not in values]
  if 'mode' in values and values['mode'] not in modes:
    problems.append(f'--mode={values["mode"]} is not one of main.py\'s modes {modes}')
  config_path = values.get(config_flag)
  if config_path is not None:
    config_path = os.path.join(ROOT, config_path.split(':')[0])
    if not os.path.isfile(config_path):
      problems.append(f'config file {values[config_flag]} does not exist')
    else:
      config = load_config(config_path)
      missing = [key for key, _ in overrides if not has_key(config, key)]
      problems += [f'--config.{key}: no such key in {values[config_flag]}' for key in missing]
      if not missing and overrides:
        try:
          parse_overrides(config_path, overrides)
        except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as error:
          problems.append(f'overrides do not parse as main.py would: {type(error).__name__}: {error}')
  return problems


def check_script(relpath, args):
  path = os.path.join(ROOT, relpath)
  if not os.path.isfile(path):
    return [f'script {relpath} does not exist']
  with open(path, encoding='utf-8') as f:
    source = f.read()
  names = [token.split('=')[0] for token in args if token.startswith('--')]
  return [f'{name} is not an argparse flag of {relpath}' for name in names
          if f"'{name}'" not in source and f'"{name}"' not in source]


def check_module(module, args):
  relpath = module.replace('.', os.sep) + '.py'
  if os.path.isfile(os.path.join(ROOT, relpath)):
    return check_script(relpath, args)
  if os.path.isdir(os.path.join(ROOT, module.replace('.', os.sep))):
    return check_script(os.path.join(module.replace('.', os.sep), '__main__.py'), args)
  top = module.split('.')[0]
  if os.path.exists(os.path.join(ROOT, top)) or os.path.exists(os.path.join(ROOT, top + '.py')):
    return [f'module {module} is not in the repository']
  try:
    installed = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    installed = False
  if not installed:
    return [f'module {module} is neither in the repository nor installed']
  paths = [token.split('::')[0] for token in args if not token.startswith('-') and ('/' in token or '.py' in token)]
  return [f'{path} (an argument of python -m {module}) does not exist' for path in paths
          if not os.path.exists(os.path.join(ROOT, path))]


@functools.cache
def make_targets():
  with open(os.path.join(ROOT, 'Makefile'), encoding='utf-8') as f:
    return {m.group(1) for m in re.finditer(r'^([A-Za-z0-9_.-]+)\s*:(?!=)', f.read(), re.MULTILINE)}


def check_command(command):
  unexpanded = VARIABLE.search(command)
  if unexpanded:
    return [f'{unexpanded.group(0)} is not defined in its code block']
  tokens = shlex.split(command, comments=True)
  program, args = tokens[0], tokens[1:]
  if program == 'make':
    targets = [token for token in args if not token.startswith('-') and '=' not in token]
    return [f'make target {target!r} is not in the Makefile' for target in targets if target not in make_targets()]
  if program == 'pip':
    files = [args[i + 1] for i, token in enumerate(args[:-1]) if token in ('-r', '--requirement')]
    return [f'requirements file {name} does not exist' for name in files
            if not os.path.isfile(os.path.join(ROOT, name))]
  if program == 'torchrun':
    scripts = [i for i, token in enumerate(args) if token.endswith('.py') and not token.startswith('-')]
    if not scripts:
      return ['torchrun runs no script']
    program, args = 'python', args[scripts[0]:]
  else:
    if not args:
      return []
    if args[0] == '-m':
      return check_module(args[1], args[2:]) if len(args) > 1 else ['python -m without a module']
    if args[0].startswith('-'):
      return []  # python -c and the like: nothing to check.
  script, args = os.path.normpath(args[0]), args[1:]
  if script == 'main.py':
    return check_main(args)
  return check_script(script, args)


@pytest.mark.parametrize('relpath,line,command', all_commands(),
                         ids=[f'{p}:{n}: {c[:70]}' for p, n, c in all_commands()])
def test_command_is_real(relpath, line, command):
  problems = check_command(command)
  assert not problems, f'{relpath}:{line}: {command}\n  ' + '\n  '.join(problems)


@pytest.mark.parametrize('relpath,line,target', all_links(), ids=[f'{p}:{n}: {t}' for p, n, t in all_links()])
def test_link_points_to_a_file(relpath, line, target):
  if re.match(r'^[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
    return  # http(s), mailto and anchors within the page.
  path = os.path.normpath(os.path.join(ROOT, os.path.dirname(relpath), target.split('#')[0]))
  inside, exists = os.path.commonpath([path, ROOT]) == ROOT, os.path.exists(path)
  assert inside, f'{relpath}:{line}: {target} points outside the repository'
  assert exists, f'{relpath}:{line}: {target} does not exist ({os.path.relpath(path, ROOT)})'


def test_documentation_is_found():
  """The collection itself works: the README's set-up commands and main.py's flags are seen."""
  commands = [shlex.split(command, comments=True) for relpath, _, command in all_commands() if relpath == 'README.md']
  assert ['make', 'demo'] in commands and ['make', 'test'] in commands
  assert any('main.py' in tokens and '--mode' in tokens for tokens in commands)
  defined, modes, required, config_flag = main_flags()
  assert config_flag == 'config' and 'workdir' in defined and 'train' in modes and 'mode' in required
  assert all_links()


def test_readme_is_short():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert len(lines) <= MAX_README_LINES, f'README.md has {len(lines)} lines; at most {MAX_README_LINES}'
