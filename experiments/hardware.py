"""What a result was measured on, for the tables and benchmark headers."""
import os
import pathlib
import platform


def cpu_model() -> str:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.is_file():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        return line.partition(":")[2].strip()
  return platform.processor() or platform.machine()


def describe() -> str:
  """'1x NVIDIA H100 (gpu)' or '2 CPU cores (Intel(R) Xeon(R) Processor)'."""
  import jax  # pylint: disable=g-import-not-at-top  (cpu_speed's parent process avoids jax)
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{jax.device_count()}x {device.device_kind} ({device.platform})"
  return f"{len(os.sched_getaffinity(0))} CPU cores ({cpu_model()})"


def cpu_times() -> list[int]:
  """The machine's CPU time counters from /proc/stat (user, nice, system, idle, iowait,
  irq, softirq, steal), or [] where there is no /proc/stat."""
  stat = pathlib.Path("/proc/stat")
  if not stat.is_file():
    return []
  return [int(v) for v in stat.read_text().splitlines()[0].split()[1:9]]


def stolen_share(before: list[int], after: list[int]) -> float | None:
  """The share of CPU time the hypervisor gave to other guests between two ``cpu_times``.

  On shared cloud cores this 'steal' slows every benchmark; a run with a large
  share measures the neighbours as much as the code.
  """
  if len(before) < 8 or len(after) < 8:
    return None
  delta = [b - a for a, b in zip(before, after)]
  return delta[7] / sum(delta) if sum(delta) else 0.0
