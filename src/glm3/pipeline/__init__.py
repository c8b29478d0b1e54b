"""The glm3 pipeline: params.yaml, stage functions shared by DVC stages and the Prefect flow, and the
local Prefect server with its deployments."""

from glm3.pipeline.layout import Layout
from glm3.pipeline.params import ParamsError, load_params
from glm3.pipeline.stages import ORDER, STAGES

__all__ = ["Layout", "ORDER", "ParamsError", "STAGES", "load_params"]
