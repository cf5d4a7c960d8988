"""segdist: distributed semantic-segmentation training.

Data flows one way through the modules named for their stage:
``shards -> stream -> augment -> models/losses -> train -> metrics -> track/checkpoint -> infer``,
with ``config`` and ``cli`` at the edges.
"""

__version__ = "0.1.0"

IGNORE_INDEX = 255
"""Mask value excluded from losses and metrics (void pixels, augmentation padding)."""
