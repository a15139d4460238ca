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
