"""Serving: the generation engine (start-up, request API), its scheduler (continuous batching on one thread that owns
the GPU), the runner (caches, CUDA graphs), sampling, detokenisation, and the service behind predict.py."""
