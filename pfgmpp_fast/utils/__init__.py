"""Utilities every layer may use: one distributed/device setup, atomic file I/O, plots and
benchmark timing. They import nothing else from pfgmpp_fast."""
