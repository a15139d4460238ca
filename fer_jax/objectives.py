"""Composable training objectives: a phase's loss is a weighted sum of named terms.

A config lists its terms as ``{name: {kind, weight, ...}}``; ``kind`` (default:
the name) picks a term from ``TERMS`` and the other fields configure it.

Every term reads named inputs, and declares them: ``reads()`` returns
``(source, name)`` pairs. The sources are the model outputs of the step
(``'student'``, the frozen ``'teacher'``, and what a step plug-in adds, e.g.
MoCo's ``'momentum'`` encoder and ``'queue'``), whose names are ``'logits'`` or
keys of the model's ``aux`` dict (see ``fer_jax.models.base``), and
``'batch'``, whose names are the dataset's fields (``'label'``, ``'valence'``,
...). The trainer checks every declared read against the models' outputs and
the dataset before compiling, and a phase needs a teacher exactly when one
of its terms reads ``'teacher'``.

Terms that need parameters (1x1 adapters, the MKD spatial-attention net) are
Linen modules whose parameters train with the student; every term runs
inside the one jitted train step. The weights are not part of a term: the
step receives them as an array argument, so changing a weight mid-run does
not recompile.
"""
import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax import losses
from fer_jax.config_utils import ConfigError
from fer_jax.models import layers
from fer_jax.registry import Registry

TERMS = Registry("loss term")
MODEL_SOURCES = ("student", "teacher", "momentum")


class ModelOutput(NamedTuple):
  logits: jax.Array
  aux: Mapping[str, jax.Array]


def layer(output: ModelOutput, name: str) -> jax.Array:
  return output.logits if name == "logits" else output.aux[name]


def layers_available(output: ModelOutput) -> list[str]:
  return ["logits", *sorted(output.aux)]


def read(inputs: Mapping[str, Any], source: str, name: str) -> jax.Array:
  """The input ``name`` of ``source``: a model layer, a batch field or plug-in state."""
  value = inputs[source]
  return layer(value, name) if isinstance(value, ModelOutput) else value[name]


def _pair_reads(pairs, student="student", teacher="teacher"):
  return tuple(r for s, t in pairs for r in ((student, s), (teacher, t)))


class _FeatureAdapter(nn.Module):
  """A 1x1 conv (FitNets' regressor) mapping student channels to the teacher's."""
  features: int

  @nn.compact
  def __call__(self, x):
    return layers.Conv(self.features, 1, use_bias=False, name="conv")(x)


class AdaptedPairs(nn.Module):
  """The student layer of each pair through a 1x1 adapter to its teacher layer's channels.

  Shared by every feature-distillation term (FitNets, MKD, ASDC); returns
  ``[(adapted student map, teacher map)]``, the teacher's without gradient.
  """
  pairs: tuple[tuple[str, str], ...]

  @nn.compact
  def __call__(self, inputs):
    out = []
    for i, (s_name, t_name) in enumerate(self.pairs):
      t_feat = jax.lax.stop_gradient(read(inputs, "teacher", t_name))
      s_feat = _FeatureAdapter(t_feat.shape[-1], name=f"adapter_{i}")(
          read(inputs, "student", s_name))
      out.append((s_feat, t_feat))
    return out


def _mean_over_adapted_pairs(pairs, inputs, pair_loss) -> jax.Array:
  """Mean of ``pair_loss(adapted student map, teacher map)`` over the layer pairs; called
  from a term's compact ``__call__``, whose parameters hold the adapters (``adapt``)."""
  adapted = AdaptedPairs(pairs, name="adapt")(inputs)
  return sum(pair_loss(s, t) for s, t in adapted) / len(adapted)


@TERMS.register("ce")
class CrossEntropy(nn.Module):
  """Cross-entropy on the student's logits; ``soft=True`` uses ``soft_label``."""
  label_smoothing: float = 0.0
  soft: bool = False

  def reads(self):
    return (("student", "logits"), ("batch", "soft_label" if self.soft else "label"))

  def __call__(self, inputs, train):
    logits = read(inputs, "student", "logits")
    labels = read(inputs, "batch", "soft_label" if self.soft else "label")
    return losses.cross_entropy(logits, labels, label_smoothing=self.label_smoothing,
                                num_classes=logits.shape[-1])


@TERMS.register("hinton_kd")
class HintonKD(nn.Module):
  """Hinton et al. 2015: T^2-scaled KL to the teacher's softened logits."""
  temperature: float = 4.0

  def reads(self):
    return (("student", "logits"), ("teacher", "logits"))

  def __call__(self, inputs, train):
    return losses.hinton_kd(read(inputs, "student", "logits"), read(inputs, "teacher", "logits"),
                            temperature=self.temperature)


@TERMS.register("fitnet")
class FitNet(nn.Module):
  """Romero et al. 2015 hints: a 1x1 adapter maps each student layer to its teacher layer.

  ``standardize``: compare channel-standardised maps, as ``mkd.standardize``.
  """
  pairs: tuple[tuple[str, str], ...] = (("stage3", "stage3"),)
  standardize: bool = False

  def reads(self):
    return _pair_reads(self.pairs)

  @nn.compact
  def __call__(self, inputs, train):
    return _mean_over_adapted_pairs(self.pairs, inputs, functools.partial(
        losses.fitnet_hint, standardize=self.standardize))


@TERMS.register("attention_transfer")
class AttentionTransfer(nn.Module):
  """Zagoruyko & Komodakis 2017, summed over layer pairs (beta/2 goes into the weight)."""
  pairs: tuple[tuple[str, str], ...] = (("stage2", "stage2"), ("stage3", "stage3"))
  p: int = 2

  def reads(self):
    return _pair_reads(self.pairs)

  def __call__(self, inputs, train):
    return sum(losses.attention_transfer(read(inputs, "student", s), read(inputs, "teacher", t),
                                         p=self.p) for s, t in self.pairs)


class _SpatialAttention(nn.Module):
  """Scores each location of a teacher map; trained to pool class evidence.

  The distillation loss cannot train these weights (it would move them to where
  the student already matches), so they learn from an auxiliary objective:
  attention-pooled teacher features must predict the label.
  """
  num_classes: int
  hidden: int = 64

  @nn.compact
  def __call__(self, teacher_feature, labels):
    h = nn.relu(layers.Conv(self.hidden, 3, name="conv1")(teacher_feature))
    scores = layers.Conv(1, 1, name="conv2")(h)[..., 0]
    b, hh, ww = scores.shape
    weights = jax.nn.softmax(scores.reshape(b, -1), axis=-1).reshape(b, hh, ww)
    pooled = jnp.einsum("bhw,bhwc->bc", weights, teacher_feature)
    logits = nn.Dense(self.num_classes, name="probe")(pooled)
    return weights, losses.cross_entropy(logits, labels, num_classes=self.num_classes)


MKD_ATTENTIONS = ("learned", "teacher_at", "uniform")


@TERMS.register("mkd")
class MultiLayerKD(nn.Module):
  """MKD of seed paper (a), reconstructed (the full text is not public).

  For each (student, teacher) layer pair a 1x1 adapter maps the student map to
  the teacher's channels and the per-location squared error is weighted by a
  spatial attention map over the teacher's features
  (``losses.spatially_weighted_feature_loss``). ``attention`` selects the map:
  ``'learned'`` (a small conv net, trained by attention pooling of the teacher
  map to predict the label; its own loss is added), ``'teacher_at'`` (the
  teacher's Zagoruyko-Komodakis activation map, no parameters) or ``'uniform'``
  (plain FitNets at several layers, the ablation). Logit distillation is a
  separate ``hinton_kd`` term so its weight is set apart. ``standardize``
  compares channel-standardised maps (PKD, ``losses.standardize_channels``):
  the paper does not say how MKD scales its feature distance, and a raw MSE
  to a teacher with large activations can outweigh the task loss early on.
  """
  pairs: tuple[tuple[str, str], ...] = (("stage2", "stage2"), ("stage3", "stage3"),
                                        ("stage4", "stage4"))
  attention: str = "learned"
  standardize: bool = False

  def reads(self):
    # The learned attention's probe predicts the label, with the student's class count.
    probe = ((("batch", "label"), ("student", "logits")) if self.attention == "learned" else ())
    return _pair_reads(self.pairs) + probe

  def _weights(self, index, t_feat, inputs):
    """The spatial weights of pair ``index`` and the attention net's own loss."""
    b, h, w, _ = t_feat.shape
    if self.attention == "learned":
      num_classes = read(inputs, "student", "logits").shape[-1]
      weights, attention_loss = _SpatialAttention(num_classes, name=f"attention_{index}")(
          t_feat, read(inputs, "batch", "label"))
      return jax.lax.stop_gradient(weights), attention_loss
    if self.attention == "teacher_at":
      return losses.attention_map(t_feat).reshape(b, h, w) ** 2, 0.0
    return jnp.ones((b, h, w), t_feat.dtype), 0.0

  @nn.compact
  def __call__(self, inputs, train):
    if self.attention not in MKD_ATTENTIONS:
      raise ConfigError(f"mkd.attention must be one of {', '.join(MKD_ATTENTIONS)}, "
                        f"got {self.attention!r}")
    total = 0.0
    for i, (s_feat, t_feat) in enumerate(AdaptedPairs(self.pairs, name="adapt")(inputs)):
      weights, attention_loss = self._weights(i, t_feat, inputs)
      total += attention_loss + losses.spatially_weighted_feature_loss(
          s_feat, t_feat, weights, standardize=self.standardize)
    return total / len(self.pairs)


_VA_TARGET = (("batch", "valence"), ("batch", "arousal"))


def _va_target(inputs):
  return jnp.stack([read(inputs, "batch", "valence"), read(inputs, "batch", "arousal")], axis=-1)


@TERMS.register("va_mse")
class ValenceArousalMSE(nn.Module):
  """Mean squared error of the student's valence/arousal head (aux['va'])."""

  def reads(self):
    return (("student", "va"), *_VA_TARGET)

  def __call__(self, inputs, train):
    return jnp.mean((read(inputs, "student", "va") - _va_target(inputs)) ** 2)


@TERMS.register("teacher_bounded")
class TeacherBounded(nn.Module):
  """Chen et al. 2017 teacher-bounded regression on valence/arousal (seed paper b)."""
  margin: float = 0.0

  def reads(self):
    return (("student", "va"), ("teacher", "va"), *_VA_TARGET)

  def __call__(self, inputs, train):
    return losses.teacher_bounded_regression(
        read(inputs, "student", "va"), read(inputs, "teacher", "va"), _va_target(inputs),
        margin=self.margin)


@TERMS.register("ccc")
class ConcordanceLoss(nn.Module):
  """1 - CCC per valence/arousal column (batch statistics)."""

  def reads(self):
    return (("student", "va"), *_VA_TARGET)

  def __call__(self, inputs, train):
    return losses.ccc_loss(read(inputs, "student", "va"), _va_target(inputs))


@TERMS.register("aux_loss")
class ModelRegulariser(nn.Module):
  """A scalar the model itself reports in aux, e.g. AFNet's 'region_loss'."""
  key: str = "region_loss"

  def reads(self):
    return (("student", self.key),)

  def __call__(self, inputs, train):
    return read(inputs, "student", self.key)


@TERMS.register("disco")
class DisCo(nn.Module):
  """Gao et al. 2022: match the teacher's L2-normalised embeddings.

  In the contrastive phase the batch holds both augmented views, so one call
  covers DisCo's two terms (query view and key view). ``adapt`` maps the
  student's embedding to the teacher's width with a learned linear layer (as
  FitNets' regressor does for maps), for a teacher of another width, e.g. a
  supervised teacher's pooled embedding.
  """
  student_layer: str = "projection"
  teacher_layer: str = "projection"
  adapt: bool = False

  def reads(self):
    return (("student", self.student_layer), ("teacher", self.teacher_layer))

  @nn.compact
  def __call__(self, inputs, train):
    student = read(inputs, "student", self.student_layer)
    teacher = read(inputs, "teacher", self.teacher_layer)
    if self.adapt:
      student = nn.Dense(teacher.shape[-1], name="adapt")(student)
    return losses.disco_embedding(student, teacher)


@TERMS.register("moco")
class MoCo(nn.Module):
  """InfoNCE of MoCo v2 against the momentum encoder's keys and the queue.

  Needs the 'moco' step plug-in (``fer_jax.plugins``): the batch holds views
  [v1; v2] and the momentum encoder's outputs are of [v2; v1], so the loss is
  MoCo's, symmetrised over the views.
  """
  temperature: float = 0.2

  def reads(self):
    return (("student", "projection"), ("momentum", "projection"), ("queue", "keys"))

  def __call__(self, inputs, train):
    return losses.info_nce(read(inputs, "student", "projection"),
                           read(inputs, "momentum", "projection"), read(inputs, "queue", "keys"),
                           temperature=self.temperature)


@TERMS.register("asdc_attention")
class ASDCAttentionFeature(nn.Module):
  """ASDC-FER (seed c) attention-guided joint feature distillation, reconstructed.

  ``standardize`` compares channel-standardised maps (PKD), for a teacher whose
  maps are on another scale than the student's, e.g. a supervised one.
  """
  pairs: tuple[tuple[str, str], ...] = (("stage4", "stage4"),)
  standardize: bool = False

  def reads(self):
    return _pair_reads(self.pairs)

  @nn.compact
  def __call__(self, inputs, train):
    return _mean_over_adapted_pairs(self.pairs, inputs, functools.partial(
        losses.attention_weighted_feature_loss, standardize=self.standardize))


@TERMS.register("asdc_key_feature")
class ASDCKeyFeature(nn.Module):
  """ASDC-FER (seed c) facial key-feature guidance, reconstructed."""
  pairs: tuple[tuple[str, str], ...] = (("stage4", "stage4"),)
  top_k_fraction: float = 0.25

  def reads(self):
    return _pair_reads(self.pairs)

  @nn.compact
  def __call__(self, inputs, train):
    return _mean_over_adapted_pairs(self.pairs, inputs, functools.partial(
        losses.key_feature_guidance, top_k_fraction=self.top_k_fraction))


def _term_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def term_specs(terms_config: Mapping[str, Any], where: str = "terms"
               ) -> tuple[tuple[str, str, tuple], ...]:
  """Validates a ``{name: {kind, weight, ...}}`` config into hashable specs."""
  specs = []
  for name, cfg in terms_config.items():
    cfg = dict(cfg)
    kind = cfg.pop("kind", name)
    cfg.pop("weight", None)
    if kind not in TERMS:
      raise ConfigError(f"{where}.{name}: unknown loss term kind {kind!r}; "
                        f"known: {', '.join(TERMS.names())}")
    unknown = sorted(set(cfg) - _term_fields(TERMS.get(kind)))
    if unknown:
      raise ConfigError(
          f"{where}.{name} ({kind}): unknown field {unknown[0]!r}; expected weight, kind or "
          f"one of {', '.join(sorted(_term_fields(TERMS.get(kind)))) or '(none)'}")
    frozen = tuple(sorted((k, _freeze(v)) for k, v in cfg.items()))
    specs.append((name, kind, frozen))
  return tuple(specs)


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def term_weights(terms_config: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {name: jnp.float32(cfg.get("weight", 1.0)) for name, cfg in terms_config.items()}


def term_reads(specs) -> list[tuple[str, str, str]]:
  """(term, source, name) for every input a term declares it reads."""
  return [(name, source, what) for name, kind, fields in specs
          for source, what in TERMS.get(kind)(**dict(fields)).reads()]


def reads_teacher(specs) -> list[str]:
  """The names of the terms that read the teacher's outputs."""
  return sorted({term for term, source, _ in term_reads(specs) if source == "teacher"})


def check_reads(specs, available: Mapping[str, list[str]], where: str) -> None:
  """Fails with one ConfigError if a term reads an input its phase does not provide.

  ``available`` maps each source the phase has to the names it provides.
  """
  for term, source, what in term_reads(specs):
    if source not in available:
      raise ConfigError(f"{where}.terms.{term} reads {source} {what!r}, but the phase has no "
                        f"{source}" + (f"; set {where}.teacher to an earlier phase"
                                       if source == "teacher" else ""))
    if what not in available[source]:
      raise ConfigError(f"{where}.terms.{term} reads {source} {what!r}, which is not there; "
                        f"available: {', '.join(available[source])}")


class Objective(nn.Module):
  """All terms of a phase; returns ``{term name: unweighted loss}``."""
  specs: tuple[tuple[str, str, tuple], ...]

  @nn.compact
  def __call__(self, inputs: Mapping[str, Any], train: bool):
    return {name: TERMS.get(kind)(**dict(fields), name=name)(inputs, train)
            for name, kind, fields in self.specs}
