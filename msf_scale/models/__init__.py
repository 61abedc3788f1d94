"""The MSF-Mamba model family and its 3-D CNN baseline: ``create_model(variant, size=..., **config_overrides)``."""
from msf_scale.models._registry import ModelOptionError, build_model, create_model, list_models, register_model
from msf_scale.models.cnn3d import CNN3D, CNN3D_SIZES, CNN3DConfig
from msf_scale.models.msf_mamba import MODEL_SIZES, VARIANTS, MSFMamba, MSFMambaConfig, build_config

__all__ = ["ModelOptionError", "build_model", "create_model", "list_models", "register_model", "MODEL_SIZES",
           "VARIANTS", "MSFMamba", "MSFMambaConfig", "build_config", "CNN3D", "CNN3D_SIZES", "CNN3DConfig"]
