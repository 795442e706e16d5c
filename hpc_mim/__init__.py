"""hpc_mim: masked image modeling pre-training and evaluation of ViTs on SLURM."""
__version__ = "0.1.0"
