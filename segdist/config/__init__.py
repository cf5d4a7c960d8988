"""One typed config schema (:mod:`.schema`) and its loader (:mod:`.load`): ``load_config(path, overrides)``.

Dataclasses with field metadata rather than pydantic models: the schema stays plain Python that
every module imports without a dependency, and the one-line messages users see (unknown key ->
the nearest valid key, bad value -> the allowed range) are written once, in :mod:`.load`.
"""

from .load import (config_from_dict, load_config, read_yaml, save_config, sections, valid_keys, validate,
                   validate_section)
from .schema import (RESIZE_MODES, STRIDE, AugmentConfig, Config, DataConfig, LossConfig, ModelConfig, OptimConfig,
                     Range, TrackConfig, TrainConfig, key)

__all__ = ["AugmentConfig", "Config", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "RESIZE_MODES",
           "STRIDE", "Range", "TrackConfig", "TrainConfig", "config_from_dict", "key", "load_config", "read_yaml",
           "save_config", "sections", "valid_keys", "validate", "validate_section"]
