"""Every resource limit in one place. Raise one by assigning to it, e.g.
``explainer.limits.MAX_IMAGE_PIXELS = 200_000_000``, or by the environment variable named beside it."""
from __future__ import annotations

import os
import time


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        pass
    try:  # "4e9"
        return int(float(os.environ[name]))
    except (KeyError, ValueError, OverflowError):
        return default


#: Largest ONNX file or byte string accepted (protobuf itself stops at 2 GiB).
MAX_MODEL_BYTES = _env_int("ONNX_EXPLAINER_MAX_MODEL_BYTES", 1 << 31)
#: Largest total size of weights and constant tensors a graph may declare, checked before any session
#: allocates (a 1 KB file can declare a ConstantOfShape of terabytes).
MAX_TENSOR_BYTES = _env_int("ONNX_EXPLAINER_MAX_TENSOR_BYTES", 4 << 30)
#: Largest image (width x height) decoded; checked from the file header before decoding.
MAX_IMAGE_PIXELS = _env_int("ONNX_EXPLAINER_MAX_IMAGE_PIXELS", 64_000_000)
#: Largest image file read.
MAX_IMAGE_BYTES = _env_int("ONNX_EXPLAINER_MAX_IMAGE_BYTES", 256 << 20)
#: Most iterations a Loop node may run (TensorFlow's while loops step through a sequence: a few hundred),
#: checked at each image shape before the graph runs: a trip count held as a constant, or computed (from
#: the input's shape) and then evaluated alone; a Loop without a trip count, which runs as long as its
#: condition holds, is refused. None: no bound (only for a trusted model).
MAX_LOOP_ITERATIONS = _env_int("ONNX_EXPLAINER_MAX_LOOP_ITERATIONS", 100_000) or None
#: Largest download accepted from the registry.
MAX_DOWNLOAD_BYTES = _env_int("ONNX_EXPLAINER_MAX_DOWNLOAD_BYTES", 1 << 31)
#: Largest memory one run may take for its intermediate tensors (onnxruntime's at the peak of a forward
#: pass; the torch module's summed over the pass, which a backward pass keeps), estimated from the
#: graph's shapes before the run: batch sizes (given or "auto") are held under it, runs in parallel
#: streams share it (fewer streams run where their batches together exceed it), and a graph whose run
#: on a single image exceeds it is refused with ResourceLimitError. None (the default): half of the
#: memory available when the run is checked (``available_memory``: the machine's ``MemAvailable``, less
#: where a cgroup or the address-space limit leaves less), at least 256 MiB.
#: Environment: EXPLAINER_MAX_RUN_BYTES (or ONNX_EXPLAINER_MAX_RUN_BYTES).
MAX_RUN_BYTES = _env_int("EXPLAINER_MAX_RUN_BYTES", _env_int("ONNX_EXPLAINER_MAX_RUN_BYTES", 0)) or None
#: the fraction of available memory taken as the run budget when MAX_RUN_BYTES is None
RUN_BYTES_FRACTION = 0.5


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of the machine's available memory (Linux
    ``MemAvailable``), what its cgroup (container) leaves, and what its address-space limit
    (``RLIMIT_AS``) leaves; None where none of them is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            found.append(max(0, int(limit) - usage))
        break
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            found.append(max(0, soft - mapped))
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    if not found:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


#: seconds a reading of the available memory serves ``max_run_bytes`` (every run asks for the budget;
#: reading /proc/meminfo each time cost about 0.1 ms a run)
AVAILABLE_MEMORY_TTL = 0.25
_reading: tuple[float, int | None] = (float("-inf"), None)  # (time.monotonic() of the reading, bytes)


def max_run_bytes() -> int:
    """The run budget now: ``MAX_RUN_BYTES``, or ``RUN_BYTES_FRACTION`` of the available memory (read
    at most every ``AVAILABLE_MEMORY_TTL`` seconds)."""
    global _reading
    if MAX_RUN_BYTES:
        return int(MAX_RUN_BYTES)
    stamp, available = _reading
    now = time.monotonic()
    if not now - stamp < AVAILABLE_MEMORY_TTL:
        available = available_memory()
        _reading = (now, available)
    if available is None:
        return 8 << 30
    return max(256 << 20, int(available * RUN_BYTES_FRACTION))
