"""Composable training objectives: a phase's loss is a weighted sum of named terms.

A config lists its terms as ``{name: {kind, weight, ...}}``; ``kind`` (default:
the name) picks a term from ``TERMS`` and the other fields configure it. Terms
address model intermediates by name: ``'logits'`` or any key of the model's
``aux`` dict (see ``fer_jax.models.base``). Terms that need parameters (1x1
adapters, the MKD spatial-attention net) are Linen modules whose parameters
train with the student; every term runs inside the one jitted train step.

The weights are not part of a term: the step receives them as an array
argument, so changing a weight mid-run does not recompile. A term that reads
the teacher's outputs says so with ``reads_teacher = True``; a phase whose terms
all read none needs no teacher forward.
"""
import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax import losses
from fer_jax.registry import Registry

TERMS = Registry("loss term")


class ModelOutput(NamedTuple):
  logits: jax.Array
  aux: Mapping[str, jax.Array]


def layer(output: ModelOutput, name: str) -> jax.Array:
  return output.logits if name == "logits" else output.aux[name]


def layers_available(output: ModelOutput) -> list[str]:
  return ["logits", *sorted(output.aux)]


def _require_teacher(term, teacher):
  if teacher is None:
    raise ValueError(f"loss term {term.name!r} needs a teacher, but this phase has none")
  return teacher


class _FeatureAdapter(nn.Module):
  """A 1x1 conv (FitNets' regressor) mapping student channels to the teacher's."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(x)


@TERMS.register("ce")
class CrossEntropy(nn.Module):
  """Cross-entropy on the student's logits; ``soft=True`` uses ``soft_label``."""
  label_smoothing: float = 0.0
  soft: bool = False

  def __call__(self, student, teacher, batch, train):
    labels = batch["soft_label"] if self.soft else batch["label"]
    return losses.cross_entropy(
        student.logits, labels, label_smoothing=self.label_smoothing,
        num_classes=student.logits.shape[-1])


@TERMS.register("hinton_kd")
class HintonKD(nn.Module):
  """Hinton et al. 2015: T^2-scaled KL to the teacher's softened logits."""
  reads_teacher: ClassVar[bool] = True
  temperature: float = 4.0

  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    return losses.hinton_kd(student.logits, teacher.logits, temperature=self.temperature)


@TERMS.register("fitnet")
class FitNet(nn.Module):
  """Romero et al. 2015 hints: a 1x1 adapter maps each student layer to its teacher layer.

  ``standardize``: compare channel-standardised maps, as ``mkd.standardize``.
  """
  reads_teacher: ClassVar[bool] = True
  pairs: tuple[tuple[str, str], ...] = (("stage3", "stage3"),)
  standardize: bool = False

  @nn.compact
  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    total = 0.0
    for i, (s_name, t_name) in enumerate(self.pairs):
      t_feat = layer(teacher, t_name)
      s_feat = _FeatureAdapter(t_feat.shape[-1], name=f"adapter_{i}")(layer(student, s_name))
      total += losses.fitnet_hint(s_feat, t_feat, standardize=self.standardize)
    return total / len(self.pairs)


@TERMS.register("attention_transfer")
class AttentionTransfer(nn.Module):
  """Zagoruyko & Komodakis 2017, summed over layer pairs (beta/2 goes into the weight)."""
  reads_teacher: ClassVar[bool] = True
  pairs: tuple[tuple[str, str], ...] = (("stage2", "stage2"), ("stage3", "stage3"))
  p: int = 2

  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    return sum(losses.attention_transfer(layer(student, s), layer(teacher, t), p=self.p)
               for s, t in self.pairs)


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
    h = nn.relu(nn.Conv(self.hidden, (3, 3), name="conv1")(teacher_feature))
    scores = nn.Conv(1, (1, 1), name="conv2")(h)[..., 0]
    b, hh, ww = scores.shape
    weights = jax.nn.softmax(scores.reshape(b, -1), axis=-1).reshape(b, hh, ww)
    pooled = jnp.einsum("bhw,bhwc->bc", weights, teacher_feature)
    logits = nn.Dense(self.num_classes, name="probe")(pooled)
    return weights, losses.cross_entropy(logits, labels, num_classes=self.num_classes)


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
  reads_teacher: ClassVar[bool] = True
  pairs: tuple[tuple[str, str], ...] = (("stage2", "stage2"), ("stage3", "stage3"),
                                        ("stage4", "stage4"))
  attention: str = "learned"
  standardize: bool = False

  @nn.compact
  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    if self.attention not in ("learned", "teacher_at", "uniform"):
      raise ValueError(f"mkd.attention must be learned, teacher_at or uniform, "
                       f"got {self.attention!r}")
    total = 0.0
    for i, (s_name, t_name) in enumerate(self.pairs):
      t_feat = jax.lax.stop_gradient(layer(teacher, t_name))
      s_feat = _FeatureAdapter(t_feat.shape[-1], name=f"adapter_{i}")(layer(student, s_name))
      b, h, w, _ = t_feat.shape
      if self.attention == "learned":
        weights, attention_loss = _SpatialAttention(
            student.logits.shape[-1], name=f"attention_{i}")(t_feat, batch["label"])
        weights = jax.lax.stop_gradient(weights)
        total += attention_loss
      elif self.attention == "teacher_at":
        weights = losses.attention_map(t_feat).reshape(b, h, w) ** 2
      else:
        weights = jnp.ones((b, h, w), t_feat.dtype)
      total += losses.spatially_weighted_feature_loss(s_feat, t_feat, weights,
                                                      standardize=self.standardize)
    return total / len(self.pairs)


@TERMS.register("va_mse")
class ValenceArousalMSE(nn.Module):
  """Mean squared error of the student's valence/arousal head (aux['va'])."""

  def __call__(self, student, teacher, batch, train):
    return jnp.mean((student.aux["va"] - _va_target(batch)) ** 2)


def _va_target(batch):
  return jnp.stack([batch["valence"], batch["arousal"]], axis=-1)


@TERMS.register("teacher_bounded")
class TeacherBounded(nn.Module):
  """Chen et al. 2017 teacher-bounded regression on valence/arousal (seed paper b)."""
  reads_teacher: ClassVar[bool] = True
  margin: float = 0.0

  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    return losses.teacher_bounded_regression(
        student.aux["va"], teacher.aux["va"], _va_target(batch), margin=self.margin)


@TERMS.register("ccc")
class ConcordanceLoss(nn.Module):
  """1 - CCC per valence/arousal column (batch statistics)."""

  def __call__(self, student, teacher, batch, train):
    return losses.ccc_loss(student.aux["va"], _va_target(batch))


@TERMS.register("aux_loss")
class ModelRegulariser(nn.Module):
  """A scalar the model itself reports in aux, e.g. AFNet's 'region_loss'."""
  key: str = "region_loss"

  def __call__(self, student, teacher, batch, train):
    return student.aux[self.key]


@TERMS.register("disco")
class DisCo(nn.Module):
  """Gao et al. 2022: match the teacher's L2-normalised embeddings.

  In the contrastive phase the batch holds both augmented views, so one call
  covers DisCo's two terms (query view and key view).
  """
  reads_teacher: ClassVar[bool] = True
  student_layer: str = "projection"
  teacher_layer: str = "projection"

  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    return losses.disco_embedding(layer(student, self.student_layer),
                                  layer(teacher, self.teacher_layer))


@TERMS.register("moco")
class MoCo(nn.Module):
  """InfoNCE of MoCo v2; the momentum encoder's keys and the queue come in ``batch``.

  The batch holds views [v1; v2] and the keys are the momentum encoder's
  projections of [v2; v1], so the loss is MoCo's, symmetrised over the views.
  """
  temperature: float = 0.2

  def __call__(self, student, teacher, batch, train):
    return losses.info_nce(student.aux["projection"], batch["moco_key"], batch["moco_queue"],
                           temperature=self.temperature)


class _AdaptedPairs(nn.Module):
  """Shared by the ASDC terms: adapts student maps to teacher channels per pair."""
  pairs: tuple[tuple[str, str], ...]

  @nn.compact
  def __call__(self, student, teacher):
    out = []
    for i, (s_name, t_name) in enumerate(self.pairs):
      t_feat = jax.lax.stop_gradient(layer(teacher, t_name))
      s_feat = _FeatureAdapter(t_feat.shape[-1], name=f"adapter_{i}")(layer(student, s_name))
      out.append((s_feat, t_feat))
    return out


@TERMS.register("asdc_attention")
class ASDCAttentionFeature(nn.Module):
  """ASDC-FER (seed c) attention-guided joint feature distillation, reconstructed."""
  reads_teacher: ClassVar[bool] = True
  pairs: tuple[tuple[str, str], ...] = (("stage4", "stage4"),)

  @nn.compact
  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    adapted = _AdaptedPairs(self.pairs, name="adapt")(student, teacher)
    return sum(losses.attention_weighted_feature_loss(s, t) for s, t in adapted) / len(adapted)


@TERMS.register("asdc_key_feature")
class ASDCKeyFeature(nn.Module):
  """ASDC-FER (seed c) facial key-feature guidance, reconstructed."""
  reads_teacher: ClassVar[bool] = True
  pairs: tuple[tuple[str, str], ...] = (("stage4", "stage4"),)
  top_k_fraction: float = 0.25

  @nn.compact
  def __call__(self, student, teacher, batch, train):
    teacher = _require_teacher(self, teacher)
    adapted = _AdaptedPairs(self.pairs, name="adapt")(student, teacher)
    return sum(losses.key_feature_guidance(s, t, top_k_fraction=self.top_k_fraction)
               for s, t in adapted) / len(adapted)


def reads_teacher(kind: str) -> bool:
  """Whether loss term ``kind`` reads the teacher's outputs."""
  return getattr(TERMS.get(kind), "reads_teacher", False)


def _term_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def term_specs(terms_config: Mapping[str, Any]) -> tuple[tuple[str, str, tuple], ...]:
  """Validates a ``{name: {kind, weight, ...}}`` config into hashable specs."""
  specs = []
  for name, cfg in terms_config.items():
    cfg = dict(cfg)
    kind = cfg.pop("kind", name)
    cfg.pop("weight", None)
    cls = TERMS.get(kind)
    unknown = set(cfg) - _term_fields(cls)
    if unknown:
      raise ValueError(
          f"loss term {name!r} ({kind}): unknown field(s) {', '.join(sorted(unknown))}; "
          f"expected weight, kind or one of {', '.join(sorted(_term_fields(cls))) or '(none)'}")
    frozen = tuple(sorted((k, _freeze(v)) for k, v in cfg.items()))
    specs.append((name, kind, frozen))
  return tuple(specs)


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def term_weights(terms_config: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {name: jnp.float32(cfg.get("weight", 1.0)) for name, cfg in terms_config.items()}


def referenced_layers(specs) -> list[tuple[str, str, str]]:
  """(term, 'student'|'teacher', layer) for every layer name a term reads."""
  out = []
  for name, _, fields in specs:
    fields = dict(fields)
    for s_name, t_name in fields.get("pairs", ()):
      out += [(name, "student", s_name), (name, "teacher", t_name)]
    if "student_layer" in fields:
      out.append((name, "student", fields["student_layer"]))
    if "teacher_layer" in fields:
      out.append((name, "teacher", fields["teacher_layer"]))
    if "key" in fields:
      out.append((name, "student", fields["key"]))
  return out


class Objective(nn.Module):
  """All terms of a phase; returns ``{term name: unweighted loss}``."""
  specs: tuple[tuple[str, str, tuple], ...]

  @nn.compact
  def __call__(self, student: ModelOutput, teacher: ModelOutput | None, batch, train: bool):
    return {name: TERMS.get(kind)(**dict(fields), name=name)(student, teacher, batch, train)
            for name, kind, fields in self.specs}
