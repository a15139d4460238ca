"""Loss terms: their declared inputs, their config validation, and MKD's attention branches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import objectives
from fer_jax.config_utils import ConfigError
from fer_jax.objectives import ModelOutput
from helpers import normal

B, C, K, D = 4, 6, 7, 8
# The terms that distil a frozen teacher, written out rather than read from the terms.
READS_TEACHER = {"hinton_kd", "fitnet", "attention_transfer", "mkd", "teacher_bounded", "disco",
                 "asdc_attention", "asdc_key_feature"}
STAGES = {f"stage{i}": (B, 8 // 2 ** (i - 2) if i < 5 else 1, 8 // 2 ** (i - 2) if i < 5 else 1, C)
          for i in range(2, 6)}


def _full_inputs(seed):
  """Every input any term reads by default, random."""
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  aux = {**{name: draw(shape) for name, shape in STAGES.items()},
         "projection": draw((B, D)), "va": jnp.tanh(draw((B, 2))),
         "region_loss": jnp.float32(0.3)}
  model = lambda: ModelOutput(draw((B, K)), {k: draw(v.shape) for k, v in aux.items()})
  batch = {"label": jnp.arange(B) % K, "soft_label": jax.nn.softmax(draw((B, K))),
           "valence": jnp.tanh(draw((B,))), "arousal": jnp.tanh(draw((B,)))}
  return {"student": model(), "teacher": model(), "momentum": model(), "batch": batch,
          "queue": {"keys": draw((16, D))}}


def _only_declared(inputs, reads):
  """``inputs`` with everything a term did not declare removed (logits become None)."""
  out = {}
  for source, name in reads:
    value = inputs[source]
    if isinstance(value, ModelOutput):
      kept = out.get(source, ModelOutput(None, {}))
      out[source] = (kept._replace(logits=value.logits) if name == "logits" else
                     ModelOutput(kept.logits, {**kept.aux, name: value.aux[name]}))
    else:
      out[source] = {**out.get(source, {}), name: value[name]}
  return out


@pytest.mark.parametrize("kind", objectives.TERMS.names())
def test_each_term_runs_on_exactly_the_inputs_it_declares(kind):
  """A term that read an undeclared input would fail here: nothing else is passed."""
  term = objectives.TERMS.get(kind)()
  reads = term.reads()
  inputs = _only_declared(_full_inputs(0), reads)
  loss, _ = term.init_with_output(jax.random.key(1), inputs, True)
  assert loss.shape == () and np.isfinite(float(loss)), kind
  specs = objectives.term_specs({"t": {"kind": kind}})
  assert (objectives.reads_teacher(specs) == ["t"]) == (kind in READS_TEACHER)
  assert (kind in READS_TEACHER) == any(s == "teacher" for s, _ in reads)


@pytest.mark.parametrize("kind", [k for k in objectives.TERMS.names()
                                  if objectives.TERMS.get(k)().reads()])
def test_each_declared_input_is_needed(kind):
  """Removing any one declared input breaks the term: the declaration is not padded."""
  term = objectives.TERMS.get(kind)()
  reads = term.reads()
  full = _full_inputs(0)
  for missing in reads:
    inputs = _only_declared(full, [r for r in reads if r != missing])
    with pytest.raises((KeyError, TypeError, AttributeError)):
      term.init_with_output(jax.random.key(1), inputs, True)


def test_unknown_term_field_and_kind_are_named():
  with pytest.raises(ConfigError, match=r"terms\.kd \(hinton_kd\): unknown field 'temprature'"):
    objectives.term_specs({"kd": {"kind": "hinton_kd", "temprature": 2.0}})
  with pytest.raises(ConfigError, match=r"terms\.x: unknown loss term kind 'hintn_kd'"):
    objectives.term_specs({"x": {"kind": "hintn_kd"}})


def test_check_reads_names_the_missing_layer_and_what_exists():
  specs = objectives.term_specs({"mkd": {"pairs": (("stage9", "stage3"),)}})
  available = {"student": ["logits", "stage3"], "teacher": ["logits", "stage3"],
               "batch": ["image", "label"]}
  with pytest.raises(ConfigError, match=r"config\.student\.terms\.mkd reads student 'stage9'.*"
                                        r"available: logits, stage3"):
    objectives.check_reads(specs, available, "config.student")
  with pytest.raises(ConfigError, match="has no teacher"):
    objectives.check_reads(objectives.term_specs({"kd": {"kind": "hinton_kd"}}),
                           {"student": ["logits"], "batch": ["label"]}, "config.student")
  va = objectives.term_specs({"va": {"kind": "va_mse"}})
  with pytest.raises(ConfigError, match="reads batch 'valence'.*available: image, label"):
    objectives.check_reads(va, {"student": ["logits", "va"], "batch": ["image", "label"]}, "c")


def _mkd_and_fitnet(attention, standardize):
  inputs = _full_inputs(3)
  pairs = (("stage3", "stage3"), ("stage4", "stage4"))
  mkd = objectives.TERMS.get("mkd")(pairs=pairs, attention=attention, standardize=standardize)
  loss, variables = mkd.init_with_output(jax.random.key(4), inputs, True)
  return inputs, pairs, mkd, loss, variables


@pytest.mark.parametrize("standardize", [False, True])
def test_mkd_uniform_attention_is_fitnets_with_the_same_adapters(standardize):
  inputs, pairs, _, loss, variables = _mkd_and_fitnet("uniform", standardize)
  fitnet = objectives.TERMS.get("fitnet")(pairs=pairs, standardize=standardize)
  expected = fitnet.apply(variables, inputs, True)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_mkd_teacher_attention_matches_a_numpy_reference():
  inputs, pairs, _, loss, variables = _mkd_and_fitnet("teacher_at", False)
  total = 0.0
  for i, (s_name, t_name) in enumerate(pairs):
    kernel = np.asarray(variables["params"]["adapt"][f"adapter_{i}"]["conv"]["kernel"])[0, 0]
    s = np.asarray(inputs["student"].aux[s_name], np.float64) @ kernel
    t = np.asarray(inputs["teacher"].aux[t_name], np.float64)
    energy = (t ** 2).mean(-1).reshape(B, -1)
    weights = (energy / np.linalg.norm(energy, axis=1, keepdims=True)) ** 2
    per_location = ((s - t) ** 2).mean(-1).reshape(B, -1)
    total += (weights * per_location).sum() / weights.sum()
  np.testing.assert_allclose(float(loss), total / len(pairs), rtol=1e-5)


def test_mkd_learned_attention_adds_its_own_probe_loss():
  """The loss is the mean over pairs of the probe's cross-entropy plus the feature error
  weighted by the probe's map (weights and cross-entropy from the trained sub-module,
  the weighting and the sum in numpy)."""
  inputs, pairs, _, loss, variables = _mkd_and_fitnet("learned", False)
  labels = inputs["batch"]["label"]
  num_classes = inputs["student"].logits.shape[-1]
  total, probe_losses = 0.0, []
  for i, (s_name, t_name) in enumerate(pairs):
    t = inputs["teacher"].aux[t_name]
    weights, probe_loss = objectives._SpatialAttention(num_classes).apply(  # pylint: disable=protected-access
        {"params": variables["params"][f"attention_{i}"]}, t, labels)
    weights = np.asarray(weights, np.float64).reshape(B, -1)
    kernel = np.asarray(variables["params"]["adapt"][f"adapter_{i}"]["conv"]["kernel"])[0, 0]
    s = np.asarray(inputs["student"].aux[s_name], np.float64) @ kernel
    per_location = ((s - np.asarray(t, np.float64)) ** 2).mean(-1).reshape(B, -1)
    probe_losses.append(float(probe_loss))
    total += float(probe_loss) + (weights * per_location).sum() / weights.sum()
  np.testing.assert_allclose(float(loss), total / len(pairs), rtol=1e-5)
  # An untrained probe over 7 classes: its cross-entropy is near log 7, not zero.
  assert all(abs(ce - np.log(num_classes)) < 1.0 for ce in probe_losses), probe_losses


def test_mkd_rejects_an_unknown_attention():
  inputs = _full_inputs(0)
  with pytest.raises(ConfigError, match="mkd.attention must be one of"):
    objectives.TERMS.get("mkd")(attention="spatial").init(jax.random.key(0), inputs, True)


def test_disco_adapter_maps_the_student_to_a_wider_teacher_embedding():
  """A supervised teacher's pooled embedding (here 3 D wide) against the student's D-wide
  projection: the learned linear map, then DisCo's squared distance of unit vectors."""
  inputs = _full_inputs(5)
  teacher = normal(6, (B, 3 * D))
  inputs["teacher"] = ModelOutput(None, {"embedding": teacher})
  disco = objectives.TERMS.get("disco")(teacher_layer="embedding", adapt=True)
  loss, variables = disco.init_with_output(jax.random.key(7), inputs, True)
  dense = variables["params"]["adapt"]
  student = (np.asarray(inputs["student"].aux["projection"], np.float64) @ dense["kernel"]
             + dense["bias"])
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  expected = np.sum((unit(student) - unit(np.asarray(teacher, np.float64))) ** 2) / B
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="must match"):
    objectives.TERMS.get("disco")(teacher_layer="embedding").init(jax.random.key(7), inputs, True)
