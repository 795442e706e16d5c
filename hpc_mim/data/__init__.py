"""Data loading. ``hpc_mim.data.ffcv_io`` is the only module that imports ffcv."""
