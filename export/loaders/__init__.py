"""Checkpoint loaders: Hugging Face folders, hub ids and GGUF files."""
