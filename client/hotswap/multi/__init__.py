"""Multi-adapter mode: K adapters resident at once, each batch row on its own adapter.

See `peftreg.hotswap.multi.host.MultiAdapterHost`.
"""

from __future__ import annotations

from peftreg.hotswap.multi.host import BatchAssignment, MultiAdapterHost, ResidentAdapter
from peftreg.hotswap.multi.residency import SlotsBusy

__all__ = ["BatchAssignment", "MultiAdapterHost", "ResidentAdapter", "SlotsBusy"]
