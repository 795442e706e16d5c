"""Data loading. ``hpc_mim.data.ffcv_io`` (loaders) and ``ffcv_write`` (the .beton writer) are the only modules that import ffcv."""
