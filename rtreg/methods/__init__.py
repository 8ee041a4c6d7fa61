"""Registration methods, each ``register(case, options, progress) -> RegistrationResult``."""
from __future__ import annotations

from typing import Callable, Dict

from ..case import Progress, RegisterOptions, RegistrationCase, RegistrationResult
from . import glide, io, protondir, quiz, tto

Register = Callable[[RegistrationCase, RegisterOptions, Progress], RegistrationResult]

METHODS: Dict[str, Register] = {io.NAME: io.register, protondir.NAME: protondir.register, tto.NAME: tto.register,
                               quiz.NAME: quiz.register, glide.NAME: glide.register}


def get_method(name: str) -> Register:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]
