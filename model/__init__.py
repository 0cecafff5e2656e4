"""mosaiq models: the p-MOS regressor and the QA-MDT diffusion transformer."""
