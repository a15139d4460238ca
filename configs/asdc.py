r"""ASDC-FER: attention-guided self-supervised distilled contrastive learning (Yan et al. 2024).

Reconstruction (methods.md §1c; the paper's text is not public): three phases.
  ``teacher``: a MoCo v2 encoder (ResNet-18), self-supervised, no labels.
  ``student``: a smaller MoCo v2 encoder trained with InfoNCE + DisCo embedding
    distillation from the frozen teacher + attention-weighted joint feature
    distillation + facial key-feature guidance (top-k teacher locations).
  ``probe``: a linear classifier on the frozen student encoder (linear
    evaluation, the protocol the paper's 62.04 % on FER2013 implies).

Embedded default, 2 CPU cores:
  python -m fer_jax.main --config=configs/asdc.py
  measured (idle 2-core CPU, 20 min 13 s wall): probe/test/accuracy 0.371
  (chance 0.143). Weak: a ridge classifier on the standardised frozen student
  embeddings gets the same 0.38, and one on raw pixels 0.60
  (tests/test_synthetic.py), so 8 epochs of MoCo on these faces learn mostly
  pose, lighting and identity, not expression.
FER2013: --config=configs/asdc.py:data=fer2013 (``,tier=quick``: the 2-core budget of configs/common.py)
Smoke test: --config=configs/asdc.py:smoke
"""
import ml_collections

from configs import common
from fer_jax import config_utils as cu
from fer_jax.data.augment import default_augment_config


def get_config(arg=None):
  arg = common.parse(arg)
  real = arg.data != "synthetic"
  full_size = common.tier(arg) == "full"  # ``quick`` and ``cpu``: the embedded default's models
  config = ml_collections.ConfigDict()
  config.name = "asdc"
  config.data = cu.data_config(arg.data, smoke=arg.smoke)
  config.augment = default_augment_config()
  # MoCo v2's views are stronger than supervised augmentation (aug-plus).
  config.augment.crop_scale = (0.4, 1.0)
  config.augment.erase_prob = 0.5
  config.eval_batch_size = 512
  config.phases = ("teacher", "student", "probe")
  epochs = 100 if real else 8
  moco = dict(plugin="moco", evaluate=False,
              plugin_kwargs=dict(queue_size=8192 if real else 2048, ema_momentum=0.99))
  stem = "small" if full_size else "imagenet"  # strided on the embedded faces for CPU speed
  teacher_encoder = dict(encoder="resnet18",
                         encoder_kwargs=dict(stem=stem, width=64 if full_size else 32))
  student_encoder = dict(encoder="resnet18",
                         encoder_kwargs=dict(stem=stem, width=32 if full_size else 16))
  config.teacher = cu.phase_config(
      "contrastive", teacher_encoder, {"moco": dict(weight=1.0, temperature=0.2)},
      epochs=epochs, batch_size=256, optimizer=cu.optimizer_config("sgd", lr=0.06, weight_decay=1e-4),
      **moco)
  config.student = cu.phase_config(
      "contrastive", student_encoder,
      {"moco": dict(weight=1.0, temperature=0.2),
       "disco": dict(weight=1.0),
       "attention": dict(kind="asdc_attention", weight=1.0, pairs=(("stage4", "stage4"),)),
       "key_feature": dict(kind="asdc_key_feature", weight=1.0, pairs=(("stage4", "stage4"),),
                           top_k_fraction=0.25)},
      epochs=epochs, batch_size=256, teacher="teacher",
      optimizer=cu.optimizer_config("sgd", lr=0.06, weight_decay=1e-4), **moco)
  config.probe = cu.phase_config(
      "linear_probe", dict(encoder="contrastive", encoder_kwargs=student_encoder),
      {"ce": dict(weight=1.0)}, epochs=30 if real else 10, batch_size=256,
      optimizer=cu.optimizer_config("sgd", lr=1.0, weight_decay=0.0),
      init_from="student", init_into="encoder", freeze=("encoder",))
  config.seed = 0
  if arg.smoke:
    config.teacher.plugin_kwargs.queue_size = config.student.plugin_kwargs.queue_size = 64
  return common.finish(config, arg)
