"""transformers integration: after ``import tensorpress``, ``AutoModelForCausalLM.from_pretrained``
loads native checkpoints through transformers' public registration hooks
(``register_quantization_config`` / ``register_quantizer``)."""
from __future__ import annotations

from .format import QUANT_METHOD, check_quantization_config, replace_modules

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                              register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:      # registered by another copy of this module
        _registered = True
        return

    @register_quantization_config(QUANT_METHOD)
    class TensorpressConfig(QuantizationConfigMixin):
        """Holds the checkpoint's quantization_config block verbatim."""

        def __init__(self, **kwargs):
            self._data = dict(kwargs)
            self._data["quant_method"] = QUANT_METHOD
            self.quant_method = QUANT_METHOD
            check_quantization_config(self._data)
            self.modules = self._data["modules"]

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            cfg = cls(**config_dict)
            return (cfg, kwargs) if return_unused_kwargs else cfg

        def to_dict(self):
            return dict(self._data)

        def to_diff_dict(self):
            return self.to_dict()

    @register_quantizer(QUANT_METHOD)
    class TensorpressHfQuantizer(HfQuantizer):
        requires_calibration = True      # only pre-compressed checkpoints; compress with tensorpress

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, **kwargs):
            replace_modules(model, self.quantization_config.modules, None)

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, *args, **kwargs):
            return False

        @property
        def is_trainable(self):
            return False

    _registered = True
