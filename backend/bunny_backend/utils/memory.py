"""How much memory loading the weights took in this process: resident growth and peak, on the CPU (anonymous
resident memory from /proc, the peak reset first through clear_refs) or an accelerator (its allocator's counters)."""
from __future__ import annotations

import torch


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class ResidentMemory:
    """Started before loading; `report(model)` after it."""

    def __init__(self, device: torch.device):
        # The first initialisation on the meta device (building the model) loads about 65 MB of torch's own
        # kernels into the process; do it now so that it is not counted as weights.
        torch.empty(1, device="meta").normal_()
        self.accelerator = getattr(torch, device.type) if device.type in ("cuda", "npu") else None
        self.device = device
        if self.accelerator is not None:
            self.accelerator.reset_peak_memory_stats(device)
            self.start = self.accelerator.memory_allocated(device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")   # resets VmHWM to the current resident size
            except OSError:
                pass
            self.start = _proc_status("RssAnon")
            self.start_total = _proc_status("VmRSS")

    def report(self, model: torch.nn.Module) -> dict[str, int]:
        """weights_bytes: the model's parameters; resident_bytes: memory held now beyond the start (anonymous on
        the CPU: memory-mapped checkpoint pages are not counted); peak_bytes: the most held at once meanwhile (on
        the CPU the checkpoint pages read count too, since the peak is VmHWM)."""
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if self.accelerator is not None:
            resident = self.accelerator.memory_allocated(self.device) - self.start
            peak = self.accelerator.max_memory_allocated(self.device) - self.start
        else:
            resident = _proc_status("RssAnon") - self.start
            peak = _proc_status("VmHWM") - self.start_total
        return {"weights_bytes": weights, "resident_bytes": resident, "peak_bytes": peak}
