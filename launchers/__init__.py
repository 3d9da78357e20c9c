"""SLURM launchers (through submitit) for pretraining and per-hospital fine-tuning.

A top-level package beside ``dist_cardio``: training knows nothing of SLURM, and the launchers reuse
the training configs instead of keeping options of their own. ``local_cluster/`` holds the project's
two-node test cluster (``start.sh``, ``stop.sh``).
"""
