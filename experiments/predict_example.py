r"""Draws docs/predict_example.png, the README's picture of ``fer_jax.predict``.

  python -m experiments.predict_example

Four FER2013 PublicTest faces (48 px, grey) are pasted, scaled and slightly
rotated, onto a photo-like canvas by the tests' scene builder (tests/faces.py),
then ``python -m fer_jax.predict CANVAS --annotate=docs`` draws each detected box
with the shipped model's top label and its probability.
"""
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import faces as scenes  # noqa: E402  pylint: disable=g-import-not-at-top

PLACEMENTS = [((150, 170), 150, -6), ((420, 150), 130, 4), ((250, 380), 120, 7),
              ((520, 360), 140, -3)]


def main():
  image, _ = scenes.scene(scenes.public_test_faces([2, 13, 30, 41]), PLACEMENTS,
                          shape=(520, 680))
  with tempfile.TemporaryDirectory() as tmp:
    canvas = pathlib.Path(tmp) / "predict_example.png"
    Image.fromarray(image).save(canvas)
    subprocess.run([sys.executable, "-m", "fer_jax.predict", str(canvas),
                    f"--annotate={REPO / 'docs'}"], check=True)


if __name__ == "__main__":
  main()
