"""Running a plan: the compressed cache and its stores, the compressor, attach (hooks and the attention function),
kernel backends, and the adapters that hold everything model- and transformers-specific. Builds on the core."""
