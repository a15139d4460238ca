"""TFDS builders of the real FER datasets; importing a module registers its builder with TFDS."""
