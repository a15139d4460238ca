"""Builds a real FER dataset from its download and prints the size of every split.

  python -m fer_jax.data.prepare NAME --manual_dir=DIR --data_dir=DIR \\
      [--config=key=value,key=value]

NAME is one of fer2013, ferplus, rafdb, affectnet, image_folder; ``--config``
overrides fields of ``real.default_config(NAME)``, e.g.
``--config=label_mode=plurality`` or
``--config=dataset_name=jaffe,grayscale=True,image_size=48``.
"""
import argparse
import ast
import sys

import ml_collections

from fer_jax import cli
from fer_jax.config_utils import ConfigError
from fer_jax.data import real
from fer_jax.data.base import DATASETS

_RESERVED = ("name", "data_dir", "manual_dir")


def parse_overrides(cfg: ml_collections.ConfigDict, text: str) -> None:
  """Applies ``key=value,...`` to ``cfg``; values are Python literals or bare strings."""
  for item in filter(None, (part.strip() for part in text.split(","))):
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"--config item {item!r} is not key=value")
    if key in _RESERVED or key not in cfg:
      known = sorted(k for k in cfg if k not in _RESERVED)
      raise ConfigError(f"--config key {key!r} is not a field of {cfg.name}; "
                       f"fields: {', '.join(known)}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    cfg[key] = value


def main(argv: list[str] | None = None) -> dict[str, int]:
  parser = argparse.ArgumentParser(
      prog="python -m fer_jax.data.prepare",
      description="Build a FER dataset as TFDS array_record files.")
  parser.add_argument("name", choices=real.NAMES)
  parser.add_argument("--manual_dir", required=True,
                      help="the downloaded files (see docs/datasets.md)")
  parser.add_argument("--data_dir", default=real.default_config("fer2013").data_dir,
                      help="TFDS data dir to write to")
  parser.add_argument("--config", default="",
                      help="comma-separated key=value overrides of the dataset config")
  args = parser.parse_args(argv)
  cfg = real.default_config(args.name)
  cfg.manual_dir = args.manual_dir
  cfg.data_dir = args.data_dir
  parse_overrides(cfg, args.config)
  dataset = DATASETS.get(args.name)(cfg)
  sizes = {split: len(source) for split, source in dataset.splits.items()}
  print(f"{dataset.name}: {len(dataset.class_names)} classes "
        f"({', '.join(dataset.class_names)})")
  for split, size in sizes.items():
    print(f"  {split}: {size}")
  return sizes


def run(argv: list[str]) -> None:
  """``main`` with bad input (an override, a malformed or missing download) as one line
  naming it and exit status 2; the build leaves nothing behind."""
  with cli.bad_input_exits():
    main(argv)


if __name__ == "__main__":
  run(sys.argv[1:])
