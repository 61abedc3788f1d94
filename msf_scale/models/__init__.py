"""The MSF-Mamba model family: ``create_model(variant, size=..., **config_overrides)``."""
from msf_scale.models._registry import create_model, list_models, register_model
from msf_scale.models.msf_mamba import MODEL_SIZES, VARIANTS, MSFMamba, MSFMambaConfig, build_config

__all__ = ["create_model", "list_models", "register_model", "MODEL_SIZES", "VARIANTS", "MSFMamba",
           "MSFMambaConfig", "build_config"]
