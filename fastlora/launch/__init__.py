"""Launchers: the Python side of each kernel in csrc_triton (checks, grids, configs).

common.py    argument flattening of a QuantState, interpreter setup, shared checks
dequant.py   fastlora.dequantize_4bit's kernel path
forward.py   the fused forward (and the small-M path)
backward.py  dx, dA, dB
buffer.py    the one dequantized-weight buffer the dequantize + cuBLAS path shares
dispatch.py  that path, and the per-shape choice between it and the fused GEMMs
"""
