"""Expression class orders and the index maps between them.

Every dataset keeps its labels in its own native order (the order of its
annotation files); models and cross-dataset evaluation pick one of the two
canonical orders below and remap. Names are compared through an alias table,
so 'happiness', 'happy' and 'HA' (the JAFFE/KDEF code) denote one class.
"""
from typing import Collection, Sequence

import numpy as np

# FER2013 (Goodfellow et al. 2013) label order, 0..6.
FER7 = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# AffectNet expression ids 0..7 (Mollahosseini et al. 2017), also EmoNet's order.
AFFECTNET8 = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger",
              "contempt")
AFFECTNET7 = AFFECTNET8[:7]
# fer2013new.csv vote columns (Barsoum et al. 2016), without unknown/NF.
FERPLUS8 = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
            "fear", "contempt")
# RAF-DB basic labels 1..7 (Li et al. 2017), stored here as 0..6.
RAFDB7 = ("surprise", "fear", "disgust", "happiness", "sadness", "anger",
          "neutral")

_CONCEPTS = {
    "anger": ("anger", "angry", "an"),
    "contempt": ("contempt", "contemptuous", "co"),
    "disgust": ("disgust", "disgusted", "di"),
    "fear": ("fear", "fearful", "afraid", "scared", "fe", "af"),
    "happy": ("happy", "happiness", "joy", "ha"),
    "neutral": ("neutral", "ne"),
    "sad": ("sad", "sadness", "sa"),
    "surprise": ("surprise", "surprised", "su"),
}
ALIASES = {alias: concept for concept, aliases in _CONCEPTS.items()
           for alias in aliases}


def canonical_name(name: str) -> str:
  """The concept a class name denotes, e.g. 'Happiness' -> 'happy'."""
  key = name.strip().lower()
  if key not in ALIASES:
    raise ValueError(f"unknown expression class name {name!r}; known names: "
                     f"{', '.join(sorted(ALIASES))}")
  return ALIASES[key]


def mapping(from_names: Sequence[str], to_names: Sequence[str],
            drop: Collection[str] = ()) -> np.ndarray:
  """Index map ``m`` with ``m[i]`` = position of ``from_names[i]`` in ``to_names``.

  Args:
    from_names: the source class order.
    to_names: the target class order.
    drop: source classes allowed to have no counterpart; they map to -1.

  Returns:
    int64 array of length ``len(from_names)``.

  Raises:
    ValueError: a name is not in the alias table, a class appears twice in one
      order, or a class has no counterpart and is not in ``drop``.
  """
  targets = {}
  for j, name in enumerate(to_names):
    concept = canonical_name(name)
    if concept in targets:
      raise ValueError(f"class order {tuple(to_names)} names {concept!r} twice")
    targets[concept] = j
  dropped = {canonical_name(name) for name in drop}
  sources = [canonical_name(name) for name in from_names]
  if len(set(sources)) != len(sources):
    raise ValueError(f"class order {tuple(from_names)} names a class twice")
  missing = [name for name, concept in zip(from_names, sources)
             if concept not in targets and concept not in dropped]
  if missing:
    raise ValueError(
        f"classes {missing} have no counterpart in {tuple(to_names)}; "
        "pass them in drop= to map them to -1")
  return np.array([targets.get(concept, -1) for concept in sources], np.int64)


def remap(labels, from_names: Sequence[str], to_names: Sequence[str],
          drop: Collection[str] = ()) -> np.ndarray:
  """Re-indexes integer ``labels`` from one class order to another.

  Labels already -1 (dropped) stay -1; dropped classes become -1.
  """
  labels = np.asarray(labels)
  index_map = mapping(from_names, to_names, drop)
  bad = (labels < -1) | (labels >= len(from_names))
  if bad.any():
    raise ValueError(f"labels {np.unique(labels[bad]).tolist()} are outside "
                     f"0..{len(from_names) - 1} for classes {tuple(from_names)}")
  return np.where(labels == -1, -1, index_map[labels]).astype(labels.dtype)
