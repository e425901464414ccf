"""The engine layer: how a training step runs.

``trainer`` is TRL's ``SFTTrainer`` with this engine's step: forward and backward from a CUDA graph
(``cuda_graphs``), gradients averaged by one all-reduce under data parallelism (``grad_sync``), and the
8-bit AdamW without per-parameter syncs (``optim``). ``distributed`` sets up the process group and says
which rank does what; ``checkpoint_rng`` gathers every rank's RNG state into each checkpoint.
"""
