"""What machine a trial trained on: host, CPU, the GPUs it was given, the driver and the versions
of the libraries that computed its numbers. Measured in the trial's worker (its own Ray-assigned
CPUs and GPUs), sent back with its first result and kept as the run's ``dml_study.machine`` tag, so
a report describes the machines that trained, not the one that built it.

Imports torch only inside :func:`describe_machine` (the driver and ``analysis`` read the keys).
"""

from __future__ import annotations

import json
import os
import platform
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULT_KEY = "machine"  # in a trial's first result: the JSON text of describe_machine()
# Distribution names, as pip knows them (faiss ships as faiss-gpu, not faiss).
PACKAGES = ["torch", "torchvision", "timm", "faiss-gpu", "numpy"]
# The keys, in the order a report shows them.
FIELDS = ["host", "cpu", "cpus", "gpus", "driver", "cuda", "python", "platform", *PACKAGES]


def describe_machine() -> dict[str, str]:
    """This process's machine: every :data:`FIELDS` key, as text ("none" where there is none)."""
    import torch

    info = {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0),
        "gpus": _gpus(torch),
        "driver": _driver(torch),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    return info


def machine_json() -> str:
    """:func:`describe_machine` as compact JSON, the form a result and a tag carry."""
    return json.dumps(describe_machine(), separators=(",", ":"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _gpus(torch) -> str:
    """The GPUs this process sees (Ray sets CUDA_VISIBLE_DEVICES to the trial's), counted by name."""
    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    counts = {name: names.count(name) for name in dict.fromkeys(names)}
    return ", ".join(f"{n} × {name}" if n > 1 else name for name, n in counts.items())


def _driver(torch) -> str:
    """The NVIDIA driver version, as torch's own ``collect_env`` finds it (nvidia-smi)."""
    if not torch.cuda.is_available():
        return "none"
    from torch.utils import collect_env

    try:
        return collect_env.get_nvidia_driver_version(collect_env.run) or "unknown"
    except Exception:  # noqa: BLE001 - a missing or odd nvidia-smi must not fail a trial
        return "unknown"
