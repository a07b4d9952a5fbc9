"""Class-conditional rectified flows and classifier-free guidance: the library, the networks, the framework."""
import pytest
import torch
from torch import nn

import models
import reflow
from configs import with_defaults
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config
from rectified_flow_pytorch import RectifiedFlow, Reflow, flow_math, solvers

MEANS = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -3.0]])  # Class c: X1 ~ N(MEANS[c], S^2 I).
S = 0.5


class ExactClassVelocity(nn.Module):
  """The exact velocity of N(0, I) -> N(MEANS[c], S^2 I) for each class c (tests/test_library.py derives it):
  v(x, t | c) = mu_c + (t S^2 - (1 - t)) / (t^2 S^2 + (1 - t)^2) (x - t mu_c). The null class gets mu = 0."""

  def __init__(self):
    super().__init__()
    self.means = nn.Parameter(torch.cat([MEANS, torch.zeros(1, 2)]), requires_grad=False)
    self.calls = []  # (batch size, labels) of every call.

  def forward(self, x, times, labels):
    self.calls.append((x.shape[0], labels.clone()))
    mu, t = self.means[labels], times[:, None]
    return mu + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * mu)


class LabelledMLP(nn.Module):
  """A small velocity network with a label embedding (num_classes + 1 rows: the last is the null class)."""

  def __init__(self, num_classes, dim=2, width=128):
    super().__init__()
    self.embedding = nn.Embedding(num_classes + 1, width)
    self.time = nn.Linear(1, width)
    self.inp = nn.Linear(dim, width)
    self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

  def forward(self, x, times, labels):
    return self.body(self.inp(x) + self.time(times[:, None]) + self.embedding(labels))


def test_labels_reach_the_model_and_sampling_reproduces_each_class_exactly():
  rf = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  labels = torch.arange(3).repeat_interleave(2000)
  samples = rf.sample(labels=labels, data_shape=(2,), solver='rk45', rtol=1e-6, atol=1e-6)
  for c in range(3):
    chosen = samples[labels == c]
    assert torch.allclose(chosen.mean(0), MEANS[c], atol=0.05), (c, chosen.mean(0))
    assert torch.allclose(chosen.std(0), torch.full((2,), S), atol=0.03), (c, chosen.std(0))


def test_guided_velocity_is_one_doubled_call_combining_conditional_and_null():
  model = ExactClassVelocity()
  rf = RectifiedFlow(model, num_classes=3)
  x, t, labels = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
  null = flow_math.null_labels(5, 3)
  v_cond, v_null = rf.velocity(x, t, labels=labels), rf.velocity(x, t, labels=null)
  model.calls.clear()
  guided = rf.velocity(x, t, labels=labels, guidance_scale=2.5)
  assert len(model.calls) == 1 and model.calls[0][0] == 10
  assert torch.equal(model.calls[0][1], torch.cat([labels, null]))
  assert torch.allclose(guided, v_null + 2.5 * (v_cond - v_null), atol=1e-6)
  assert torch.allclose(rf.velocity(x, t, labels=labels, guidance_scale=0.0), v_null)
  assert torch.equal(rf.velocity(x, t), v_null)  # No labels: the unconditional velocity.


def test_guided_sampling_counts_two_network_evaluations_per_step():
  rf = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  labels = torch.tensor([0, 1, 2])
  rf.sample(labels=labels, data_shape=(2,), steps=8, solver='heun')
  assert rf.last_sample_nfe == 16
  rf.sample(labels=labels, data_shape=(2,), steps=8, solver='heun', guidance_scale=3.0)
  assert rf.last_sample_nfe == 32


def test_guidance_interval_guides_only_the_samples_whose_time_lies_in_it():
  model = ExactClassVelocity()
  rf = RectifiedFlow(model, num_classes=3)
  x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
  t = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.9])
  v_cond, v_null = rf.velocity(x, t, labels=labels), rf.velocity(x, t, labels=flow_math.null_labels(6, 3))
  inside = torch.tensor([False, False, True, True, True, False])  # 0.5 <= t <= 0.8, both ends included.
  model.calls.clear()
  guided = rf.velocity(x, t, labels=labels, guidance_scale=3.0, guidance_interval=(0.5, 0.8))
  assert len(model.calls) == 1 and model.calls[0][0] == 12  # Still one doubled call: no branch on t.
  assert torch.allclose(guided[inside], (v_null + 3.0 * (v_cond - v_null))[inside], atol=1e-6)
  assert torch.equal(guided[~inside], v_cond[~inside])
  # w = 0 within the interval is the unconditional velocity there, the conditional one elsewhere.
  unguided = rf.velocity(x, t, labels=labels, guidance_scale=0.0, guidance_interval=(0.5, 0.8))
  assert torch.allclose(unguided[inside], v_null[inside], atol=1e-6) and torch.equal(unguided[~inside], v_cond[~inside])
  # The whole of [0, 1] is plain guidance.
  assert torch.allclose(rf.velocity(x, t, labels=labels, guidance_scale=3.0, guidance_interval=(0.0, 1.0)),
                        rf.velocity(x, t, labels=labels, guidance_scale=3.0), atol=1e-6)


def test_sampling_with_a_guidance_interval_is_unguided_then_guided_euler():
  rf = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  noise, labels = torch.randn(9, 2), torch.arange(3).repeat(3)
  sample = rf.sample(noise=noise, labels=labels, steps=8, guidance_scale=2.0, guidance_interval=(0.5, 1.0))
  assert rf.last_sample_nfe == 16  # Two network evaluations per step, inside the interval or not.
  # Euler from t = 0: the steps at t = 0, 1/8, 2/8, 3/8 are conditional, those at 4/8 .. 7/8 guided.
  half, _ = solvers.euler(lambda x, t: rf.velocity(x, t, labels=labels), noise, steps=4, t0=0.0, t1=0.5)
  expected, _ = solvers.euler(lambda x, t: rf.velocity(x, t, labels=labels, guidance_scale=2.0), half, steps=4,
                              t0=0.5, t1=1.0)
  assert torch.allclose(sample, expected, atol=1e-5)
  assert not torch.allclose(sample, rf.sample(noise=noise, labels=labels, steps=8, guidance_scale=2.0), atol=1e-2)
  # A teacher guided over an interval makes the pairs of that interval.
  teacher = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  reflow = Reflow(teacher, teacher_steps=8, teacher_guidance_scale=2.0, teacher_guidance_interval=(0.5, 1.0))
  _, x1, _ = reflow.generate_pairs(noise=noise, labels=labels)
  assert torch.allclose(x1, expected, atol=1e-5)


@pytest.mark.parametrize('interval', [(0.5, 0.5), (0.8, 0.2), (-0.1, 1.0), (0.0, 1.5), (0.5,), 'all'])
def test_a_bad_guidance_interval_is_a_clear_error(interval):
  rf = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  labels = torch.tensor([0, 1])
  with pytest.raises(ValueError, match='guidance_interval'):
    rf.velocity(torch.randn(2, 2), torch.rand(2), labels=labels, guidance_scale=2.0, guidance_interval=interval)
  with pytest.raises(ValueError, match='guidance_interval'):
    Reflow(rf, teacher_guidance_scale=2.0, teacher_guidance_interval=interval)


def test_label_dropout_replaces_labels_by_the_null_class_in_training_only():
  rf = RectifiedFlow(ExactClassVelocity(), num_classes=3, label_dropout=0.25)
  labels = torch.zeros(20000, dtype=torch.long)
  rf.train()
  dropped = rf.training_labels(labels, 20000, 'cpu')
  assert set(dropped.unique().tolist()) == {0, 3}
  assert abs((dropped == 3).float().mean().item() - 0.25) < 0.015
  rf.eval()
  assert torch.equal(rf.training_labels(labels, 20000, 'cpu'), labels)
  drops = torch.arange(20000) % 2 == 0  # Given drops apply in either mode (the framework draws its own).
  assert torch.equal(rf.training_labels(labels, 20000, 'cpu', drops), torch.where(drops, 3, 0))


def test_conditional_training_learns_each_class_and_guidance_pushes_away_from_the_rest():
  torch.manual_seed(0)
  rf = RectifiedFlow(LabelledMLP(3), num_classes=3, label_dropout=0.2)
  optimizer = torch.optim.Adam(rf.parameters(), lr=2e-3)
  for _ in range(600):
    labels = torch.randint(3, (512,))
    optimizer.zero_grad()
    rf(MEANS[labels] + S * torch.randn(512, 2), labels=labels).backward()
    optimizer.step()
  rf.eval()
  labels = torch.zeros(2000, dtype=torch.long)
  noise = torch.randn(2000, 2)
  plain = rf.sample(noise=noise, labels=labels, solver='rk45', rtol=1e-4, atol=1e-4)
  guided = rf.sample(noise=noise, labels=labels, solver='rk45', rtol=1e-4, atol=1e-4, guidance_scale=3.0)
  unconditional = rf.sample(noise=noise, solver='rk45', rtol=1e-4, atol=1e-4)
  assert (plain.mean(0) - MEANS[0]).norm() < 0.3, plain.mean(0)
  assert (unconditional.mean(0) - MEANS.mean(0)).norm() < 0.5, unconditional.mean(0)  # The mixture's mean.
  # Guidance moves samples of class 0 further from the other classes: fewer land nearer another class's mean.
  def others_nearer(x):
    return ((x[:, None] - MEANS[None]).norm(dim=2).argmin(1) != 0).float().mean().item()
  assert others_nearer(guided) <= others_nearer(plain)
  assert ((guided - MEANS[1:].mean(0)).norm(dim=1).mean() > (plain - MEANS[1:].mean(0)).norm(dim=1).mean())


def test_conditional_reflow_keeps_the_labels_of_the_guided_teacher_pairs():
  teacher = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  teacher.data_shape = (2,)
  reflow = Reflow(teacher, batch_size=6, teacher_steps=4, teacher_guidance_scale=2.0)
  noise, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
  x0, x1, pair_labels = reflow.generate_pairs(noise=noise, labels=labels)
  # The teacher's guided Euler solve written out: 4 steps of 1/4 from t = 0, v = v_null + 2 (v_cond - v_null) with
  # v_null the exact velocity of the null class (label 3).
  exact, null = ExactClassVelocity(), torch.full((6,), 3)
  expected = noise.clone()
  for i in range(4):
    t = torch.full((6,), i / 4)
    v_cond, v_null = exact(expected, t, labels), exact(expected, t, null)
    expected = expected + (v_null + 2.0 * (v_cond - v_null)) / 4
  assert torch.equal(x0, noise) and torch.equal(pair_labels, labels)
  torch.testing.assert_close(x1, expected, atol=1e-5, rtol=0)
  _, _, drawn = reflow.generate_pairs(batch_size=300)
  assert drawn.shape == (300,) and set(drawn.tolist()) == {0, 1, 2}
  student = reflow.model.model
  student.calls.clear()
  reflow(noise=noise, labels=labels)  # The student's loss sees each pair's own label.
  assert torch.equal(student.calls[-1][1], labels)


def test_bad_labels_and_guidance_are_clear_errors():
  conditional = RectifiedFlow(ExactClassVelocity(), num_classes=3)
  unconditional = RectifiedFlow(nn.Linear(2, 2), time_cond_kwarg=None)
  x, t = torch.randn(4, 2), torch.rand(4)
  with pytest.raises(ValueError, match='num_classes'):
    unconditional.velocity(x, t, labels=torch.zeros(4, dtype=torch.long))
  with pytest.raises(ValueError, match='num_classes'):
    unconditional.velocity(x, t, guidance_scale=2.0)
  with pytest.raises(ValueError, match='labels='):
    conditional.velocity(x, t, guidance_scale=2.0)
  with pytest.raises(ValueError, match=r'\[0, 3\]'):
    conditional.velocity(x, t, labels=torch.tensor([0, 1, 4, 0]))
  with pytest.raises(ValueError, match='integers'):
    conditional.velocity(x, t, labels=torch.zeros(4))
  with pytest.raises(ValueError, match='one per sample'):
    conditional.velocity(x, t, labels=torch.zeros(3, dtype=torch.long))
  with pytest.raises(ValueError, match='label_dropout'):
    RectifiedFlow(nn.Linear(2, 2), label_dropout=0.1)
  with pytest.raises(ValueError, match='num_classes'):
    Reflow(conditional, RectifiedFlow(ExactClassVelocity(), num_classes=4))
  with pytest.raises(ValueError, match='teacher_guidance_scale=2.0 needs a class-conditional teacher'):
    Reflow(unconditional, teacher_guidance_scale=2.0)
  with pytest.raises(ValueError, match='batch_size=5 but 4 labels'):
    Reflow(conditional).generate_pairs(batch_size=5, labels=torch.zeros(4, dtype=torch.long))
  # Any integer dtype of labels reaches the model as int64 (nn.Embedding takes no uint8).
  conditional.model.calls.clear()
  conditional.velocity(x, t, labels=torch.tensor([0, 1, 2, 3], dtype=torch.uint8))
  assert conditional.model.calls[-1][1].dtype == torch.long


def tiny_network_config(num_classes):
  config = digits_config()
  config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 16, (1, 2), ()
  config.model.num_classes = num_classes
  config.model.init_scale = 1.0  # Not the published near-zero output layers, so that outputs differ visibly.
  return config


def test_network_label_embedding_changes_the_output_and_defaults_to_the_null_class():
  torch.manual_seed(0)
  net = models.create_model(tiny_network_config(10)).eval()
  assert tuple(net.label_embedding.weight.shape) == (11, 64)
  x, t = torch.randn(3, 1, 16, 16), torch.full((3,), 500.0)
  with torch.no_grad():
    by_label = [net(x, t, torch.full((3,), c)) for c in range(11)]
    assert torch.equal(net(x, t), by_label[10])
  assert all(not torch.allclose(by_label[0], other) for other in by_label[1:])


def test_unconditional_network_state_dict_is_unchanged_by_the_label_option():
  torch.manual_seed(0)
  plain = models.create_model(tiny_network_config(0))
  config = tiny_network_config(0)
  del config.model['num_classes']  # A config written before class conditioning.
  torch.manual_seed(0)
  older = models.create_model(with_defaults(config))  # As main.py reads it.
  assert list(plain.state_dict()) == list(older.state_dict())
  assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), older.state_dict().values()))
  torch.manual_seed(0)
  conditional = models.create_model(tiny_network_config(10))
  assert [k for k in conditional.state_dict() if k not in plain.state_dict()] == ['label_embedding.weight']
  with pytest.raises(ValueError, match='num_classes'):
    plain(torch.randn(2, 1, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))
  config = tiny_network_config(10)
  config.model.conditional = False
  with pytest.raises(ValueError, match='conditional=True'):
    models.create_model(config)


# ---------------------------------------------------------------------------------------------------------------
# The framework: training, snapshot grids, pairs, reflow and evaluation of a class-conditional digits model.

def conditional_digits_config(**training):
  from tests.helpers import tiny_digits_config

  config = tiny_digits_config(**training)
  config.model.num_classes = 10
  config.training.label_dropout = 0.5
  config.sampling.guidance_scale = 2.0
  config.data.random_flip = False
  return config


@pytest.fixture(scope='module')
def conditional_teacher(tmp_path_factory):
  """A tiny class-conditional digits flow trained for 2 updates; its snapshot checkpoint_1.pth (read only)."""
  import run_lib

  workdir = tmp_path_factory.mktemp('conditional_teacher')
  run_lib.train(conditional_digits_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2), str(workdir))
  return workdir


def test_conditional_training_resumes_exactly_and_draws_one_grid_row_per_class(tmp_path):
  from PIL import Image

  import run_lib
  from tests.helpers import flat_state

  def config(n_iters):
    return conditional_digits_config(n_iters=n_iters, snapshot_freq=4, snapshot_freq_for_preemption=2)

  uninterrupted = run_lib.train(config(4), str(tmp_path / 'a'))
  run_lib.train(config(2), str(tmp_path / 'b'))
  resumed = run_lib.train(config(4), str(tmp_path / 'b'))
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert 'param.0' in expected and expected.keys() == actual.keys()
  for key in expected:
    assert torch.equal(expected[key], actual[key]), key
  assert tuple(uninterrupted['model'].label_embedding.weight.shape) == (11, 64)
  # snapshot_batch_size=4 < 10 classes: the digits 0-3, one row of one sample each: 1 x 4 cells of 16 + 2 pixels.
  with Image.open(tmp_path / 'a' / 'samples' / 'iter_4' / 'sample.png') as grid:
    assert grid.size == (2 + 18, 2 + 4 * 18)
  layout = config(4)
  layout.sampling.snapshot_batch_size = 25  # Two of each digit, one row per digit.
  count, labels, columns = run_lib.snapshot_grid_layout(layout)
  assert count == 20 and columns == 2 and torch.equal(labels, torch.arange(10).repeat_interleave(2))


def test_label_dropout_of_each_row_is_that_of_the_global_batch():
  import losses

  model = ExactClassVelocity()
  rf = RectifiedFlow(model, num_classes=3, label_dropout=0.5)
  x1, labels = torch.randn(8, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
  loss_fn = losses.get_loss_fn(conditional_digits_config(), rf)

  def seen_labels(rows):
    model.calls.clear()
    loss_fn(None, x1[rows], generator=torch.Generator().manual_seed(3), global_batch=8, rows=rows,
            labels=labels[rows])
    return model.calls[-1][1]

  whole = seen_labels(slice(0, 8))
  assert 0 < int((whole == 3).sum()) < 8  # Some, not all, replaced by the null class.
  assert torch.equal(torch.cat([seen_labels(slice(0, 4)), seen_labels(slice(4, 8))]), whole)
  model.calls.clear()
  loss_fn(None, x1, labels=labels, train=False)  # Held-out losses keep every label.
  assert torch.equal(model.calls[-1][1], labels)


@pytest.mark.parametrize('pair_format', ['float32', 'compact'])
def test_pairs_of_a_guided_teacher_carry_their_labels(conditional_teacher, tmp_path, pair_format):
  import losses
  import run_lib
  import sampling
  from datasets import reflow_pairs

  config = conditional_digits_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=1)
  config.reflow.last_flow_ckpt = str(conditional_teacher / 'checkpoints' / 'checkpoint_1.pth')
  config.reflow.data_root = str(tmp_path / 'pairs')
  config.reflow.total_number_of_samples, config.reflow.pairs_per_shard = 12, 5
  config.reflow.pair_format = pair_format
  config.sampling.sample_N = 3
  manifest = reflow.generate_reflow_pairs(config, str(tmp_path / 'gen'))
  assert manifest['count'] == 12 and manifest['num_classes'] == 10 and manifest['guidance_scale'] == 2.0
  assert manifest['nfe']['mean'] == 6  # 3 Euler steps, each one call on the doubled batch: 2 evaluations.

  pairs = reflow_pairs.PairShards(str(tmp_path / 'pairs'), (1, 16, 16), num_classes=10)
  items = [pairs[i] for i in range(12)]
  z0, z1 = torch.stack([item.x0 for item in items]), torch.stack([item.x1 for item in items])
  labels = torch.tensor([item.labels for item in items])
  assert torch.equal(labels, torch.arange(12) % 10)  # eval.labels='all': pair i is made for digit i mod 10.
  net, _ = reflow.load_teacher(config, torch.device('cpu'))
  expected = sampling.get_sampling_fn(config, z0.shape)(losses.build_rectified_flow(config, net), noise=z0,
                                                         labels=labels)
  assert expected.contributing_nfe == 6
  tolerance = 2e-3 if pair_format == 'compact' else 1e-5
  torch.testing.assert_close(z1, expected.x, atol=tolerance, rtol=1e-3 if pair_format == 'compact' else 0)

  # A conditional student trains on them in the shared loop and resumes; an unconditional one is refused.
  config.reflow.reflow_type = 'train_reflow'
  config.training.label_dropout, config.sampling.guidance_scale = 0.0, 1.0
  assert run_lib.reflow(config, str(tmp_path / 'student'))['step'] == 2
  config.training.n_iters = 3
  assert run_lib.reflow(config, str(tmp_path / 'student'))['step'] == 3
  with pytest.raises(ValueError, match='num_classes=10'):
    reflow_pairs.PairShards(str(tmp_path / 'pairs'), (1, 16, 16), num_classes=0)


def test_online_reflow_of_a_guided_teacher_trains_a_conditional_student(conditional_teacher, tmp_path):
  import losses
  import run_lib
  from speed import cuda_graphs

  config = conditional_digits_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=1)
  config.reflow.last_flow_ckpt = str(conditional_teacher / 'checkpoints' / 'checkpoint_1.pth')
  config.reflow.reflow_type = 'train_online_reflow'
  config.reflow.online_teacher_steps = 2
  # The teacher is guided with reflow.teacher_guidance_scale; the student's own samples are not guided again.
  config.reflow.teacher_guidance_scale, config.sampling.guidance_scale = 2.0, 1.0
  config.reflow.teacher_guidance_t_min = 0.5
  state = run_lib.reflow(config, str(tmp_path / 'online'))
  assert state['step'] == 2 and hasattr(state['model'], 'label_embedding')
  net, _ = reflow.load_teacher(config, torch.device('cpu'))
  teacher = reflow.online_teacher(config, net)  # The guided teacher's velocity, as online reflow solves it.
  assert isinstance(teacher, cuda_graphs.GraphedVelocity) and teacher.enabled  # Replayed from graphs on CUDA.
  x, t, labels = torch.randn(3, 1, 16, 16), torch.tensor([0.2, 0.6, 0.9]), torch.tensor([1, 4, 7])
  guided = losses.build_rectified_flow(config, net).velocity(x, t, labels=labels, guidance_scale=2.0,
                                                              guidance_interval=(0.5, 1.0))
  assert torch.equal(teacher(x, t, labels), guided)
  asked = []  # Which labels the pair batches ask the teacher for.

  def recording_teacher(x, t, labels=None):
    asked.append(labels)
    return torch.zeros_like(x)
  batch = next(reflow.online_pair_batches(config, recording_teacher, torch.device('cpu'),
                                          torch.Generator().manual_seed(0)))
  assert asked and all(torch.equal(seen, batch.labels) for seen in asked)


def test_a_checkpoint_of_another_num_classes_names_the_setting_to_change(conditional_teacher):

  config = conditional_digits_config()
  config.model.num_classes, config.sampling.guidance_scale = 0, 1.0
  config.reflow.last_flow_ckpt = str(conditional_teacher / 'checkpoints' / 'checkpoint_1.pth')
  with pytest.raises(ValueError, match='set --config.model.num_classes=10'):
    reflow.load_teacher(config, torch.device('cpu'))


def test_guided_sampling_without_labels_is_a_clear_error():
  import losses
  import sampling

  config = conditional_digits_config()
  config.sampling.sample_N = 2
  flow_ = losses.build_rectified_flow(config, models.create_model(tiny_network_config(10)))
  sample = sampling.get_sampling_fn(config, (2, 1, 16, 16))
  with pytest.raises(ValueError, match='pass labels='):
    sample(flow_, noise=torch.randn(2, 1, 16, 16))
  assert sample(flow_, noise=torch.randn(2, 1, 16, 16), labels=torch.tensor([3, 4])).contributing_nfe == 4


def test_sampling_guidance_interval_setting_guides_those_times_and_is_recorded_when_set():
  import losses
  import sampling

  config = conditional_digits_config()
  config.sampling.use_ode_sampler, config.sampling.sample_N = 'euler', 4
  config.sampling.guidance_t_min = 0.5
  torch.manual_seed(0)
  flow_ = losses.build_rectified_flow(config, models.create_model(tiny_network_config(10))).eval()
  noise, labels = torch.randn(3, 1, 16, 16), torch.tensor([3, 4, 5])
  solution = sampling.get_sampling_fn(config, (3, 1, 16, 16))(flow_, noise=noise, labels=labels)
  with torch.no_grad():  # The published Euler grid t_i = eps + i / 4: guided from t = 0.5 + eps on.
    expected, _ = solvers.euler(lambda x, t: flow_.velocity(x, t, labels=labels, guidance_scale=2.0,
                                                           guidance_interval=(0.5, 1.0)),
                                noise, steps=4, t0=config.training.time_eps, t1=1.0, step_size=0.25)
  assert torch.allclose(solution.x, expected, atol=1e-5) and solution.contributing_nfe == 8
  config.sampling.guidance_t_min = 0.0
  everywhere = sampling.get_sampling_fn(config, (3, 1, 16, 16))(flow_, noise=noise, labels=labels)
  assert not torch.allclose(everywhere.x, expected, atol=1e-4)
  # Manifests name the interval only when it is not all of [0, 1], so folders made before it stay valid.
  assert 'guidance_t_min' not in sampling.sampler_settings(config)
  config.sampling.guidance_t_min = 0.5
  settings = sampling.sampler_settings(config)
  assert settings['guidance_t_min'] == 0.5 and 'guidance_t_max' not in settings
  config.sampling.guidance_t_max = 0.4
  with pytest.raises(ValueError, match='--config.sampling.guidance_t_min'):
    sampling.get_sampling_fn(config, (3, 1, 16, 16))


def test_sampling_labels_follow_eval_labels_and_bad_lists_are_clear_errors():
  import sampling

  config = conditional_digits_config()
  assert torch.equal(sampling.sample_labels(config, 7, 6), torch.tensor([7, 8, 9, 0, 1, 2]))
  config.eval.labels = '3,5'
  assert torch.equal(sampling.sample_labels(config, 1, 4), torch.tensor([5, 3, 5, 3]))
  for bad in ('3,10', 'seven', ''):
    config.eval.labels = bad
    with pytest.raises(ValueError, match='eval.labels'):
      sampling.sample_labels(config, 0, 4)
  config.model.num_classes = 0
  assert sampling.sample_labels(config, 0, 4) is None
  with pytest.raises(ValueError, match='guidance_scale=2.0 needs a class-conditional model'):
    sampling.check_sampling_options(config)
  images, columns = sampling.per_class_grid(torch.arange(1, 13), torch.tensor([2, 0, 1] * 4), per_class=3)
  assert columns == 3 and images.tolist() == [2, 5, 8, 3, 6, 9, 1, 4, 7]
  images, columns = sampling.per_class_grid(torch.arange(1, 6), torch.tensor([0, 1, 0, 1, 0]), per_class=3)
  assert columns == 3 and images.tolist() == [1, 3, 5, 2, 4, 0]  # Class 1's row is padded with a blank cell.


def test_eval_of_a_guided_model_reports_class_agreement_per_class_and_doubled_nfe(conditional_teacher, tmp_path,
                                                                                 random_inception_weights):
  import json
  import math
  import shutil

  from PIL import Image

  import run_lib
  from tests.helpers import eval_config

  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copy(conditional_teacher / 'checkpoints' / 'checkpoint_1.pth', workdir / 'checkpoints')
  stats = workdir / 'stats.npz'
  config = eval_config(stats, random_inception_weights, num_samples=20, batch_size=8)
  run_lib.compute_reference_stats(config, str(workdir))
  for key, value in conditional_digits_config().model.items():
    config.model[key] = value
  config.sampling.guidance_scale = 2.0
  run_lib.evaluate(config, str(workdir), 'eval')
  report = json.loads((workdir / 'eval' / 'report_1.json').read_text())
  assert report['guidance_scale'] == 2.0 and report['nfe_mean'] == 6  # 3 Euler steps on the doubled batch.
  assert math.isfinite(report['fid'])
  # Two samples of each digit (labels i mod 10): the per-class figures are multiples of 1/2 and average to the total.
  per_class = report['class_accuracy_per_class']
  assert sorted(per_class) == [str(c) for c in range(10)] and all(v in (0.0, 0.5, 1.0) for v in per_class.values())
  assert report['class_accuracy'] == pytest.approx(sum(per_class.values()) / 10)
  with Image.open(workdir / 'eval' / 'ckpt_1' / 'sample_grid.png') as grid:  # One row of 2 per digit.
    assert grid.size == (2 + 2 * 18, 2 + 10 * 18)
  # The manifest holds the guidance: another scale in the same folder is refused, not mixed.
  config.sampling.guidance_scale = 3.0
  with pytest.raises(ValueError, match='guidance_scale'):
    run_lib.evaluate(config, str(workdir), 'eval')


def test_digit_classifier_is_accurate_and_its_measures_have_their_closed_forms():
  import evaluation_digits

  with torch.no_grad():  # Trains also when called under no_grad (as evaluation code may be).
    classifier = evaluation_digits.digit_classifier()
  images, labels, held_out = evaluation_digits.real_digits()
  assert evaluation_digits.class_accuracy(classifier, images[held_out], labels[held_out]) >= 0.97
  assert evaluation_digits.frechet_distance_digits(classifier, images, images) == pytest.approx(0.0, abs=1e-6)
  wrong = (labels + 1) % 10
  assert evaluation_digits.class_accuracy(classifier, images, wrong) <= 0.05
  per_class = evaluation_digits.per_class_accuracy(classifier, images[held_out], labels[held_out])
  counts = torch.bincount(labels[held_out], minlength=10)
  assert sorted(per_class) == list(range(10))
  assert sum(per_class[c] * counts[c].item() for c in per_class) / counts.sum().item() == pytest.approx(
      evaluation_digits.class_accuracy(classifier, images[held_out], labels[held_out]))
  with pytest.raises(ValueError, match='data.image_size=16'):
    evaluation_digits.class_accuracy(classifier, torch.zeros(2, 1, 8, 8), torch.zeros(2))
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    evaluation_digits.class_accuracy(classifier, images[:2], torch.tensor([0, 10]))
