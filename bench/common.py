"""What every benchmarked system shares: the request, the workload description, and the process measurements.

Every system gets the perf client's request (bunny-client perf): its default prompt with one synthetic 384x384
PNG, greedy, `ignore_eos`, exactly `max_tokens` new tokens; N identical requests sent at once per round. Rows are
`bunny_client.perf_stats.BatchStats`, so the three systems are summarised by the same arithmetic.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import socket
import time
from dataclasses import asdict, dataclass, field

from bunny_client.captions import DEFAULT_PROMPT
from bunny_client.perf import synthetic_image
from bunny_client.perf_stats import BatchStats, RequestTiming, summarize

__all__ = ["Workload", "BatchStats", "RequestTiming", "summarize", "peak_rss_bytes", "machine_info", "emit"]


@dataclass(slots=True)
class Workload:
    batch_sizes: list[int]
    max_tokens: int
    rounds: int = 1
    warmup: int = 1
    prompt: str = DEFAULT_PROMPT
    prefix_caching: bool = False      # off: every request pays its own prefill, as transformers' generate does
    threads: int = 0                  # torch intra-op threads; 0: all cores
    cuda_graphs: bool = True          # EngineConfig.cuda_graphs (used on CUDA only)
    tensor_parallel_size: int = 1     # EngineConfig.tensor_parallel_size
    distinct_images: bool = False     # a different image in each request (bench/images.py); engine runs only
    quantization: str = "none"        # EngineConfig.quantization (our systems; transformers stays unquantized)
    image: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not self.image:
            self.image = synthetic_image()

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("image")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        return cls(**json.loads(text))

    def describe(self) -> dict:
        d = json.loads(self.to_json())
        d["image"] = ("a different 384x384 PNG per request (bench/images.py)" if self.distinct_images else
                      "synthetic 384x384 PNG (bunny_client.perf.synthetic_image)")
        return d


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def descendants(root_pid: int) -> list[int]:
    """`root_pid` and its living descendants (e.g. bunny-serve, tritonserver and its python stub)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_peak_rss_bytes(root_pid: int) -> int:
    """Sum of VmHWM (peak RSS) over `root_pid` and its living descendants."""
    total = 0
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def tree_cpu_by_name(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `root_pid` and its living descendants, summed per process name
    (/proc/PID/comm: e.g. python, tritonserver, triton_python_b)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, tail = f.read().rpartition(")")
            fields = tail.split()
            name = head.partition("(")[2]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) used so far by `root_pid` and its living descendants."""
    return sum(tree_cpu_by_name(root_pid).values())


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores; /proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def settle(max_busy: float = 0.1, window_s: float = 0.25, timeout_s: float = 20.0) -> float:
    """Wait until the machine is quiet: all cores together busy at most `max_busy` of a `window_s` window (or
    timeout_s passed). Returns the seconds waited. A server may keep its cores busy after its last response
    (vLLM CPU's worker polls its message queue at 100% of a core for 1-2 s), which would otherwise be charged to
    whatever is measured next."""
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while time.perf_counter() - t0 < timeout_s:
        busy0 = cpu_busy_seconds()
        time.sleep(window_s)
        if (cpu_busy_seconds() - busy0) / (window_s * cores) <= max_busy:
            break
    return time.perf_counter() - t0


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished (waited-for) children and their waited-for descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_info() -> dict:
    import torch
    info = {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    from bunny_backend.utils.cpu_features import detect
    info["cpu_features"] = detect().describe()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def machine_name(info: dict) -> str:
    if info.get("gpu"):
        return info["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    return f"cpu-{info['cpu_count']}core"


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, marked so the runner can find it among other output."""
    print("BENCH_RESULT " + json.dumps(result), flush=True)
