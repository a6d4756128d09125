"""Launching on SLURM (submitit, sbatch scripts, requeue); knows nothing of ML."""
