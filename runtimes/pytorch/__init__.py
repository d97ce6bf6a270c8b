"""Perch's own PyTorch runtimes: the transformers reference, the eager export-ready modules, the fast CUDA path."""
