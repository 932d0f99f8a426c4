"""How ONNX values are obtained: one small interface, one module per way.

=============  =====================================================================
``base``       :class:`ValueSource`, the interface, and :class:`SourceFacts`
``markers``    :class:`MarkerSource`: instrument, export, extract, run the debug model
``attach``     :class:`AttachSource`: the user's plain file (or fxalign's plain export) and
               forward hooks; ``attach_local`` reruns modules on the file's values
``facts``      coverage, exporter warnings and runtime failures located at a module
=============  =====================================================================
"""

from fxalign.sources.attach import AttachSource
from fxalign.sources.base import SourceFacts, ValueSource
from fxalign.sources.markers import MarkerSource

__all__ = ["AttachSource", "MarkerSource", "SourceFacts", "ValueSource"]
