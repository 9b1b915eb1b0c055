"""HPipe-style pipeline parallelism for long prompts: measured per-layer and link costs
(``profiler``), a DP layer partition over heterogeneous devices (``partition``), the optimal
token-dimension slicing of the prompt (``slicing``, ``plan``), and the runtime that runs it over
torch.distributed point-to-point, one process per stage (``runtime``), on a plain Llama stage
(``llama``)."""
from .llama import LlamaConfig, LlamaStage, checkpoint_weights, random_weights, read_safetensors
from .partition import Partition, even_partition, partition_layers
from .plan import Plan, plan_pipeline, stage_models
from .profiler import ComputeCost, LinkCost, load_profile, profile_compute, profile_links, save_profile
from .runtime import PipelineRuntime
from .slicing import Schedule, StageModel, optimal_slicing, schedule, uniform_slicing

__all__ = ["LlamaConfig", "LlamaStage", "checkpoint_weights", "random_weights", "read_safetensors", "Partition",
           "even_partition", "partition_layers", "Plan", "plan_pipeline", "stage_models", "ComputeCost", "LinkCost",
           "load_profile", "profile_compute", "profile_links", "save_profile", "PipelineRuntime", "Schedule",
           "StageModel", "optimal_slicing", "schedule", "uniform_slicing"]
