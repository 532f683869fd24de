"""Training-free recovery: re-fit compressed layers to the original model's outputs."""
