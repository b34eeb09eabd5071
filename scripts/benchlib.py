"""What every benchmark states about the machine it ran on."""

from __future__ import annotations

import os
import platform


def machine(setup: str) -> dict:
    """CPU model, cores, memory and software of this machine, plus how the run was set up."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "setup": setup}
