"""Inference: the KV-cache manager, the scheduler, the model runners, the engine, sampling and generate()."""
