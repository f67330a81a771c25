"""Compatibility, in one place: what a checkpoint holds and how older checkpoints are read (`checkpoints`), old
decoding setting names (`decoding`), and module and config names of older versions (`names`).

Tested on real files written by captioner 0.1 and 0.2 (tests/fixtures/old/).
"""
