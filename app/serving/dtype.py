"""The dtype of the serving engine's weights (`DETOX_SERVING_DTYPE`), torch-free so `/readyz` can
say it before a model loads. Edits keep their own precision (`DETOX_DTYPE`); a version's deltas
are applied in the serving dtype.

"auto" takes bfloat16 on CUDA, and on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX),
where it measured faster (README, "Batching and precision"); float32 on other CPUs, where
bfloat16 is emulated.
"""

from __future__ import annotations

from pathlib import Path

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU flag that gives native bfloat16 arithmetic, if the CPU has one (Linux only)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return next((flag for flag in _NATIVE_BF16_FLAGS if flag in flags), None)


def serving_dtype(setting: str, device_type: str) -> tuple[str, str]:
    """(dtype, why) for weights served on `device_type` ("cpu", "cuda", ...)."""
    if setting != "auto":
        return setting, "DETOX_SERVING_DTYPE"
    if device_type == "cuda":
        return "bfloat16", "auto: CUDA"
    flag = cpu_bf16_flag()
    if flag is not None:
        return "bfloat16", f"auto: the CPU has {flag}"
    return "float32", "auto: the CPU has no native bfloat16"


def describe(setting: str, device: str) -> str:
    """What `serving_dtype` will choose, said before torch is imported (device may be "auto")."""
    if setting != "auto" or device.startswith("cuda"):
        dtype, why = serving_dtype(setting, "cuda" if device.startswith("cuda") else "cpu")
        return f"{dtype} weights ({why})"
    dtype, why = serving_dtype(setting, "cpu")
    on_cpu = f"{dtype} weights on the CPU ({why})"
    return on_cpu if device == "cpu" else f"bfloat16 weights on CUDA, else {on_cpu}"
