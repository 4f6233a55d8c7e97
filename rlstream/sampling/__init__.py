"""What the workers and the trainer's evaluation share: torch setup and model loading, the
local (transformers) and remote (OpenAI-compatible) samplers, and resolving and calling a
rollout_fn."""
