"""Operator tools that read a run without taking part in it: ``status``, ``audit``,
``dead`` and the live progress display. They import only the contract (rlstream.core)."""
