"""The human-readable report: one table of every phase's results, then confusion matrices."""
import collections


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{100 * value:.2f}" if abs(value) <= 1.0 else f"{value:.4g}"
  return f"{value:,}" if isinstance(value, int) else str(value)


def render(config, results: dict, details: dict) -> str:
  by_phase = collections.defaultdict(dict)
  for key, value in results.items():
    phase, _, rest = key.partition("/")
    by_phase[phase][rest] = value
  lines = [f"# fer_jax report: {config.get('name', 'run')}", "",
           f"Dataset `{config.data.name}`; model selection on `{config.data.eval_split}`, "
           f"reported on `{config.data.test_split}`. Accuracies in %; MACs are conv+FC "
           "multiply-accumulates for one image.", ""]
  for phase in config.phases:
    values, cfg = by_phase[phase], config[phase]
    lines += [f"## {phase}: `{cfg.model}`", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in values.items()]
    info = details["phases"].get(phase, {})
    if info.get("best_step"):
      lines += ["", f"Best `{config.data.eval_split}` accuracy at step {info['best_step']}."]
    for split, confusion in info.get("confusion", {}).items():
      names = list(details["class_names"])
      lines += ["", f"Confusion on `{split}` (rows: true, columns: predicted):", "",
                "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
      lines += [f"| {names[i]} | " + " | ".join(str(c) for c in row) + " |"
                for i, row in enumerate(confusion)]
    lines.append("")
  return "\n".join(lines)


def summary(config, results: dict) -> str:
  """A few lines for the terminal: each phase's clean and occluded test results."""
  test = config.data.test_split
  shown = ((test, "accuracy", "{:.2%} " + test),
           (f"{test}_occluded", "accuracy", "{:.2%} occluded"),
           (test, "valence_ccc", "valence CCC {:.3f}"),
           (test, "arousal_ccc", "arousal CCC {:.3f}"))
  lines = []
  for phase in config.phases:
    parts = [fmt.format(results[f"{phase}/{split}/{metric}"]) for split, metric, fmt in shown
             if f"{phase}/{split}/{metric}" in results]
    lines.append(f"{phase} ({config[phase].model}): {', '.join(parts) or 'no evaluation'}")
  return "\n".join(lines)
