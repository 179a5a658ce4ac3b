"""Benchmarks of pyfused against eager PyTorch, torch.compile and CUDA graphs: ``python -m bench --help``."""
