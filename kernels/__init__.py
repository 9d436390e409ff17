"""Triton kernels, one op per file, installed as `smolvlm_fast.kernels`: each module implements the ops its name
says (activations.py: silu_and_mul and gelu_tanh) to the contracts of smolvlm_fast/ops/README.md.

smolvlm_fast/ops/registry.py finds them (ops.registry.TRITON_MODULES) and runs one on a CUDA tensor where no CUDA
kernel covers the call; a module's COVERS, where it has one, says which calls its kernel takes (without one: any
call on a CUDA device). The tests run them on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
"""
