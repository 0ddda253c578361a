"""DeepSeek-VL2-small inference in plain PyTorch, served with Cog: ``model`` (the model, its loader), ``kernels``
(Triton kernels), ``inputs`` (images, processor), ``serving`` (engine, scheduler, runner, sampling), ``startup``
(download, read-ahead, compilation). README.md has a map of the modules."""
