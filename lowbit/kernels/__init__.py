"""Decode kernels: Triton kernels beside their plain-PyTorch `*_reference` oracles.

This package imports only torch and triton (DESIGN.md: imports point right)."""
