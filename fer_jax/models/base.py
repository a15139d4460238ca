"""The model registry and the contract every model family follows.

Contract (every registered model):
  * a Flax Linen ``nn.Module`` whose constructor takes ``num_classes: int`` and
    ``num_va: int = 0`` plus family-specific fields with defaults;
  * ``__call__(self, x, train: bool = False) -> (logits, aux)`` where ``x`` is a
    float32 NHWC batch (1 or 3 channels, any size the family supports) and
    ``logits`` is ``[B, num_classes]``;
  * ``aux`` is a flat dict of named intermediates that distillation terms address
    by name: ``'stem'``, ``'stage1'`` ... ``'stageN'`` (NHWC feature maps, one per
    resolution stage, the last one the final map before pooling),
    ``'embedding'`` (pooled pre-logit features ``[B, D]``), family extras such as
    ``'fpn_p3'`` or ``'att_map'``, and ``'va'`` (``[B, num_va]`` valence/arousal,
    unbounded) when ``num_va > 0``; a scalar entry whose name ends in ``'_loss'``
    is a regulariser the model offers (AFNet's ``'region_loss'``), which a
    config adds with an ``aux_loss`` term and a weight of its choosing;
  * BatchNorm statistics live in the ``'batch_stats'`` collection and every
    random draw (dropout, channel masks) uses the ``'dropout'`` RNG stream.
"""
from fer_jax.registry import Registry

MODELS = Registry("model")
