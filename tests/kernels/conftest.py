"""Kernel tests run the Triton kernels on the CPU through the Triton interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be in the environment before ``triton.language`` is first imported;
the root ``tests/conftest.py`` sets it for the whole suite (only without CUDA, so a GPU machine
tests the compiled kernels). The Triton-path tests skip with that reason otherwise.
"""
