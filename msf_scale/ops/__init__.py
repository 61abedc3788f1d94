"""The hot operators, each one public function with backends (private modules) and a reference beside it:
``selective_scan`` (ops/scan.py), ``state_fusion`` (ops/state_fusion.py), ``causal_depthwise_conv1d``."""
from msf_scale.ops.causal_conv1d import causal_depthwise_conv1d
from msf_scale.ops.scan import selective_scan, selective_scan_ref
from msf_scale.ops.state_fusion import state_fusion, state_fusion_ref

__all__ = ["causal_depthwise_conv1d", "selective_scan", "selective_scan_ref", "state_fusion", "state_fusion_ref"]
