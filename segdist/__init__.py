"""segdist: distributed semantic-segmentation training.

Data flows one way through the modules named for their stage:
``shards -> stream -> augment -> models/losses -> train -> metrics -> track/checkpoint -> infer``,
with ``config`` and ``cli`` at the edges.
"""

from importlib.metadata import PackageNotFoundError, version

from .shards.reader import IGNORE_INDEX  # the public name; its home is the shard format (stdlib only)

try:
    __version__ = version("segdist")  # one home: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = ["IGNORE_INDEX", "__version__", "load"]


def load(ckpt, device: str = "auto", mode: str | None = None, **options):
    """A predictor for a saved model folder (``runs/<name>/best``)::

        model = segdist.load("runs/human-seg/best")
        mask = model.predict("photo.jpg")        # uint8 (H, W) class ids at the photo's size (binary: 0/1)
        probs = model.predict_proba(rgb_array)    # float32 (C, H, W); C = 1 for a binary model

    ``predict``/``predict_proba`` take a file path, encoded image bytes or a uint8 RGB array
    (H, W, 3). ``device``: ``auto`` (CUDA when there is one), ``cpu``, ``cuda:1``...;
    ``mode``: ``resize`` (default: the model's training resize rule) or ``sliding``;
    ``options``: ``overlap``, ``blend``, ``tta`` (e.g. ``"flip,0.75,1.0,1.25"``), ``threshold``,
    ``batch_size``. See :class:`segdist.infer.Predictor`.
    """
    from .infer import Predictor  # here, not at the top: `import segdist` stays free of torch

    return Predictor.load(ckpt, device=device, mode=mode, **options)
