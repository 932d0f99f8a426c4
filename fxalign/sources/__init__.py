"""How ONNX values are obtained: one small interface, one module per way.

=============  =====================================================================
``base``       :class:`ValueSource`, the interface, and :class:`SourceFacts`
``markers``    :class:`MarkerSource`: instrument, export, extract, run the debug model
``facts``      coverage, exporter warnings and runtime failures located at a module
=============  =====================================================================
"""

from fxalign.sources.base import SourceFacts, ValueSource
from fxalign.sources.markers import MarkerSource

__all__ = ["MarkerSource", "SourceFacts", "ValueSource"]
