r"""Post-hoc logit adjustment of a trained model: accuracy against mean-class accuracy.

Subtracting ``tau * log(prior)`` from the logits, with ``prior`` the training
split's class frequencies (Menon et al., "Long-tail learning via logit
adjustment", ICLR 2021; ``tau = 1`` targets balanced error), trades a little
accuracy for recall on rare classes. Nothing is retrained. The same ranking
comes from the probabilities a deployed model outputs: ``p / prior**tau``.

Prints, for each tau of a fixed grid, accuracy and mean-class accuracy on the
selection and test splits and each class's test recall (a markdown table):

  python -m experiments.logit_adjustment --model=fer2013-student --data=fer2013
"""
import jax
import numpy as np
from absl import flags

from fer_jax import cli
from fer_jax import config_utils
from fer_jax import evaluate
from fer_jax import metrics as metrics_lib
from fer_jax import model_dir
from fer_jax import steps
from fer_jax import train

FLAGS = flags.FLAGS


def adjusted_metrics(logits: np.ndarray, labels: np.ndarray, log_prior: np.ndarray,
                     tau: float) -> dict:
  """Accuracy, mean-class accuracy and per-class recall of ``logits - tau * log_prior``."""
  values = metrics_lib.classification(labels, logits - tau * log_prior)
  confusion = np.asarray(values.pop("confusion"))
  values["recall"] = np.diag(confusion) / np.maximum(confusion.sum(1), 1)
  return values


def main(argv):
  del argv
  with cli.bad_input_exits(model_dir.ModelDirError):
    model = model_dir.load(FLAGS.model)
    data_cfg = config_utils.data_config(FLAGS.data)
    _, arrays = train.load_data(data_cfg)
  counts = np.bincount(np.asarray(arrays[data_cfg.train_split]["label"]),
                       minlength=len(model.class_names))
  log_prior = np.log(counts / counts.sum())
  mesh = train.make_mesh()
  predict = steps.make_predict(model.forward, mesh)
  variables = jax.device_put(model.variables, steps.replicated(mesh))
  logits = {split: evaluate.predict_split(predict, variables, arrays[split], 512, mesh)[0]
            for split in (data_cfg.eval_split, data_cfg.test_split)}
  print(f"training class counts ({', '.join(model.class_names)}): {counts.tolist()}\n")
  print(f"| tau | {data_cfg.eval_split} accuracy / mean-class | {data_cfg.test_split} accuracy"
        f" / mean-class | {data_cfg.test_split} recall ({', '.join(model.class_names)}) |")
  print("|---|---|---|---|")
  for tau in map(float, FLAGS.taus):
    row = [f"{tau:g}"]
    for split in logits:
      values = adjusted_metrics(logits[split], arrays[split]["label"], log_prior, tau)
      row.append(f"{100 * values['accuracy']:.2f} / {100 * values['mean_class_accuracy']:.2f} %")
    row.append(" / ".join(f"{100 * r:.1f}" for r in values["recall"]))
    print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
  # Defined here, not on import: the tests import this module beside other scripts'.
  flags.DEFINE_string("model", "fer2013-student", "A model directory or a pretrained name.")
  flags.DEFINE_string("data", "fer2013", "A data preset (fer_jax.config_utils.data_config).")
  flags.DEFINE_list("taus", ["0", "0.25", "0.5", "0.75", "1"], "The grid of tau.")
  cli.run(main)
