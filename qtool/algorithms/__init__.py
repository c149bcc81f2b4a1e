"""Accuracy algorithms that change the fp32 model before planning (opt-in, ``--algorithms``)."""

KNOWN = ("cle",)
