"""Kernel tests run the Triton kernels on the CPU through the Triton interpreter.

``TRITON_INTERPRET=1`` must be in the environment before ``triton.language`` is first imported
(Triton builds its library functions for the interpreter only then); the Triton-path tests skip
with that reason otherwise. Setting it in the root ``tests/conftest.py`` covers every folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
