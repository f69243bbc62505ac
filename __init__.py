"""genssl: self-supervised image encoders trained with generated positive views.

The repository root is the ``genssl`` package; its top-level folders are the subpackages
(``genssl.kernels``, ``genssl.models``, ``genssl.data``, ``genssl.generators``, ``genssl.engine``,
``genssl.recipes``, ``genssl.bench``, ``genssl.tests``). See ARCHITECTURE in docs/.
"""

__version__ = "0.1.0"
