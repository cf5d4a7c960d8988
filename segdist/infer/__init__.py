"""Inference: class masks and probabilities at each input's original size.

A :class:`Predictor` (``segdist.load(ckpt)``) turns an image into probabilities at its size:

* ``resize`` mode (default): the model's training rule (``data.resize``), deterministically.
  ``squash``: the image squashed to ``data.image_size``, exactly the training stream's pixels
  (reduced JPEG decode included); ``short_side``: the short side resized to ``data.short_side``,
  aspect kept; ``none``: native size. Inputs are padded (bottom/right, black, as the
  augmentation's warp pads) to a multiple of 32 and the padding is cut off the logits again.
* ``sliding`` mode: windows of the training size over the image after that mode's deterministic
  rescale (``short_side``: scaled; ``squash`` and ``none``: native). Stride = window x (1 -
  overlap) (MMSegmentation's convention), the last window aligned to the far edge, an image
  smaller than a window padded. Window logits are blended with Gaussian, linear (tent) or mean
  weights normalised to sum to 1 at every pixel; a single window is used as it is, so sliding
  over an image of one window's size *is* plain inference.

Each view's logits are resized to the original size (bilinear) and become probabilities there
(sigmoid of a binary model's one channel, else softmax); test-time augmentation averages the
probabilities of the horizontal flip and of other scales. The class is the argmax, or for a
binary model probability > ``threshold``. The windows of a chunk of images are batched on the
device by shape.

``predict_paths`` (``segdist predict``) reads files, folders, globs and shard folders and writes
index PNG masks (binary 0/255; palette PNGs when the model has class colours), overlays and
optionally probabilities; an input that cannot be read is skipped with its reason and the
summary counts it. :mod:`segdist.evaluate` (``segdist eval --mode resize|sliding``, ``--full-res``)
scores the same predictions against each val sample's native-size mask, exactly across ranks.

The modules, one job each:

* :mod:`.options` -- :class:`Options`, ``--tta`` parsing, the modes, blends and defaults;
* :mod:`.geometry` -- the views and windows over an image, blend weights (pure: no model);
* :mod:`.predictor` -- pixels of each view, :class:`Predictor` (batching, blending, probabilities);
* :mod:`.inputs` -- files, folders, globs and shard folders as jobs with output names;
* :mod:`.writers` -- mask PNGs (palettes) and probability files;
* :mod:`.predict` -- :func:`predict_paths`, the ``segdist predict`` command.

``options`` (no torch) loads with the package; the names of the other modules load on first use, so
the CLI reads the defaults of :mod:`.options` without loading torch, OpenCV or SMP/timm.
"""

from __future__ import annotations

from ..lazy import attach
from .options import BATCH_SIZE, BLENDS, MODES, PROB_FORMATS, Options, describe_options, options_for, parse_tta

_LAZY = {
    "geometry": ("View", "blend_weights", "plan_views", "view_size", "window_starts"),
    "inputs": ("Job", "find_inputs", "list_images", "output_names", "shard_jobs", "unique_names"),
    "writers": ("mask_png", "model_palette", "palette_table", "png", "prob_files"),
    "predictor": ("Predictor", "Source", "as_source", "network_input", "pick_device", "read_image",
                  "view_pixels", "view_tiles"),
    "predict": ("predict_paths",),
}

__all__ = [  # the lazy names too (see _LAZY)
    "BATCH_SIZE", "BLENDS", "MODES", "PROB_FORMATS", "Job", "Options", "Predictor", "Source", "View",
    "as_source", "blend_weights", "describe_options", "find_inputs", "list_images", "mask_png",
    "model_palette", "network_input", "options_for", "output_names", "palette_table", "parse_tta", "pick_device",
    "plan_views", "png", "predict_paths", "prob_files", "read_image", "shard_jobs", "unique_names", "view_pixels",
    "view_size", "view_tiles", "window_starts",
]

__getattr__, __dir__ = attach(__name__, _LAZY)
