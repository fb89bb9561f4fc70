"""nanolib: the library the nanolib GPT course's notebooks export.

Every module here but this one is generated from a notebook in notebooks/ (see its header); edit the
notebook and run `python tools/nb.py export`, never the module.
"""
__version__ = "0.1.0"
