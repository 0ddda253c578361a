"""DeepSeek-VL2-small inference in plain PyTorch: model, checkpoint loader, processor and engine."""
