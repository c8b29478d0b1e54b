"""One thin script per DVC stage: `python -m stages.<name>` runs glm3.pipeline.stages.<name>."""
