"""Evaluation metrics in numpy, with EmoNet's definitions for valence/arousal."""
import numpy as np


def classification(labels: np.ndarray, logits: np.ndarray) -> dict:
  """Accuracy, mean per-class accuracy (classes present in ``labels``) and confusion."""
  num_classes = logits.shape[-1]
  pred = np.argmax(logits, -1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  support = confusion.sum(1)
  present = support > 0
  per_class = np.diag(confusion)[present] / support[present]
  return {"accuracy": float(np.mean(pred == labels)),
          "mean_class_accuracy": float(np.mean(per_class)),
          "confusion": confusion.tolist()}


def valence_arousal(target: np.ndarray, pred: np.ndarray, names=("valence", "arousal")) -> dict:
  """RMSE, CCC, PCC and SAGR per dimension as in emonet/metrics.py (preds clipped to [-1, 1])."""
  pred = np.clip(pred, -1.0, 1.0)
  out = {}
  for i, name in enumerate(names):
    p, g = pred[:, i].astype(np.float64), target[:, i].astype(np.float64)
    pcc = float(np.corrcoef(p, g)[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
    ccc = 2 * pcc * p.std() * g.std() / (p.var() + g.var() + (p.mean() - g.mean()) ** 2)
    out.update({f"{name}_rmse": float(np.sqrt(np.mean((p - g) ** 2))),
                f"{name}_ccc": float(ccc), f"{name}_pcc": pcc,
                f"{name}_sagr": float(np.mean(np.sign(p) == np.sign(g)))})
  return out
