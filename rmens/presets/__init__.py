"""Built-in pipeline presets (YAML)."""
