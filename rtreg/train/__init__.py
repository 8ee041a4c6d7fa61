"""Reproducible training commands (``rtreg train <method>``) that write ``Resources/Models/*``."""
