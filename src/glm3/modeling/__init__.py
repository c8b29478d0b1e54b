"""The model itself: its config and presets, the tokenizer, the MindSpore network and its linear methods."""
