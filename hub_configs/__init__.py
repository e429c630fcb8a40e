"""JSON presets for CompreSSM models, installed as `modeling_compressm.hub_configs` (load with
`modeling_compressm.presets.load_preset(name)`)."""
