"""Development support: built-in presets, trained fixtures and the offline tokenizer."""
