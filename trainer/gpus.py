# What the visible GPUs are, read through NVML (the driver's management library, via nvidia-ml-py, the
# binding torch.cuda's own utilization() uses), which creates no CUDA context. The launcher's parent asks
# here: a CUDA context would hold ~0.5 GB of GPU 0 for the whole job or sweep, and on a GPU in
# exclusive-process mode would keep rank 0 from starting at all.
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    index: int  # NVML's, which ignores CUDA_VISIBLE_DEVICES
    uuid: str
    name: str
    capability: tuple[int, int]
    memory_bytes: int


def visible(gpus: list[GPU], cuda_visible_devices: str | None) -> list[GPU]:
    # The GPUs a CUDA process would see, as CUDA_VISIBLE_DEVICES selects them: indices or UUID prefixes, in
    # that order, up to the first entry that names none (as CUDA reads it). Unset: all.
    if cuda_visible_devices is None:
        return list(gpus)
    out = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = [
            g
            for g in gpus
            if (entry.isdigit() and g.index == int(entry)) or (entry and g.uuid.startswith(entry))
        ]
        if len(match) != 1 or match[0] in out:
            break
        out.append(match[0])
    return out


def all_gpus() -> list[GPU]:
    # [] where there is no NVML (no driver, a CPU machine).
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(
                GPU(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def visible_gpus() -> list[GPU]:
    return visible(all_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def capability() -> tuple[int, int] | None:
    # The lowest compute capability among the visible GPUs (what every rank can run), None without GPUs.
    caps = [g.capability for g in visible_gpus()]
    return min(caps) if caps else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
