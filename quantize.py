"""quantize.py: LLM.int8 8-bit quantization (Dettmers et al. 2022) in a few readable lines.

(Being written.)
"""
