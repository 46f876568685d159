"""remask: the ReMask objective, the Lilith optimizer, the one-cycle schedule, the training loop and the command line.

(Being written: see the issues. This module brings model.py, data.py and quantize.py together.)
"""
