"""data.py: tokenizer, prompt formats, dataset readers and downloader, and the ReMask masking pipeline.

(Being written.)
"""
