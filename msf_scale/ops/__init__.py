"""The two hot operators, each one public function with backends and a reference beside it."""
from msf_scale.ops.selective_scan import selective_scan, selective_scan_ref
from msf_scale.ops.state_fusion import state_fusion, state_fusion_ref

__all__ = ["selective_scan", "selective_scan_ref", "state_fusion", "state_fusion_ref"]
