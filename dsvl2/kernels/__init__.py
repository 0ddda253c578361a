"""Triton kernels: the decode step's (one token per row, up to ``launch.MAX_DECODE_TOKENS`` rows; CUDA) and the
prefill's grouped expert product. The tests run them through Triton's interpreter on the CPU and compare each with
the plain PyTorch code it replaces.

A decode step is a matter of reading weights, so every decode kernel is a matrix-vector product or a reduction laid
out for memory bandwidth, reading straight from the model's tensors (no gather copies, no host synchronisation,
fixed launch shapes for CUDA graphs). Each is batch invariant: a row's bits are the same whether it runs alone or
among other rows, because every row is computed by the same code in programs of its own (or, where a program
serves several rows, by the same operations one row after the other, or in tensor-core tiles of a fixed shape), with
block sizes chosen from the weights' shapes, never from the number of rows. One module per family of operators:

- ``attention``: MLA decode over the compressed cache (``mla_prologue``, ``latent_attention``, ``value_out``);
- ``linear``: every other linear layer of a step (``gemv``);
- ``norm``: the decoder's RMSNorms (``rms_norm``);
- ``moe`` (router, operators) and ``moe_experts`` (expert kernels): the whole MoE block in three launches;
- ``grouped_gemm``: the prefill's routed experts (``grouped_mm``);
- ``launch``: what they share: launching, compiling ahead (``precompile``), programmatic dependent launch on Hopper
  (``PDL``), the tensor-core helpers and their tiles.

Each is registered as a ``torch.library`` custom operator with its fake implementation (its output shapes) beside
it, so that ``torch.compile`` keeps each decoder layer one graph around them (the element-wise code between them
fuses) instead of breaking the graph at every launch.
"""

from . import attention, grouped_gemm, launch, linear, moe, moe_experts, norm

__all__ = ["attention", "grouped_gemm", "launch", "linear", "moe", "moe_experts", "norm"]
