"""The model: DeepSeek-VL2's vision tower, projector and language model (multi-head latent attention, mixture of
experts) in plain PyTorch, its configuration, the checkpoint loader, and tiny random checkpoints for the tests."""
