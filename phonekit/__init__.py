"""phonekit: ship small language models to phones.

The package is one namespace over the repo's folders: ``phonekit.export`` (models,
loaders, exporters, CLI), ``phonekit.quant`` (quantization schemes) and
``phonekit.profiles`` (device profiles and the memory budget).
"""

__version__ = "0.1.0"
