"""model.py: the StableLM transformer family from scratch, Hugging Face checkpoint I/O and KV-cache generation.

(Being written.)
"""
