"""Triton kernels, one op per file, installed as `smolvlm_fast.kernels`.

Empty for now: every op in `smolvlm_fast.ops` runs its PyTorch reference until the Triton issues land.
"""
