"""Perch: export Falcon and Falcon-Mamba to Core ML and ONNX with real state, and prove every artifact.

`perch` holds what every side shares (errors, the state/manifest spec, loading, presets, the CLI);
`exporter` converts, `runtimes` runs artifacts (and never imports `exporter`), `validate` checks them.
"""
__version__ = "0.1.0"
