"""MindIR export of a model and running the exported graphs."""
