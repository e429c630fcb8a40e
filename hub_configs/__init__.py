"""JSON presets for CompreSSM models, installed as `modeling_compressm.hub_configs` (load with
`modeling_compressm.app.presets.load_preset(name)`)."""
