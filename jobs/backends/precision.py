"""Which device and dtype the local engine computes in on this machine, and the CPU named beside every timing.

`model.dtype: auto` takes bf16 only where the hardware computes it natively (a CUDA device that supports it, a CPU
with AMX or AVX512-BF16) and float32 elsewhere: on an AVX2-only CPU bf16 matrix products run 18-29x slower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jobs.cpu import cpu_flags, cpu_name
from jobs.errors import InputError

if TYPE_CHECKING:  # types only: jobs.config imports the backend registry, whose local backend imports the engine
    from jobs.config import ModelConfig

_NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def set_threads() -> None:
    # the local runner gives each parallel step a share of the cores through DISTILL_THREADS
    threads = int(os.environ.get("DISTILL_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def describe_cpu() -> str:
    """The CPU in one line, for every timing printed beside it (bf16 speed differs 20x between CPUs)."""
    name = cpu_name()
    flags = cpu_flags()
    present = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return (f"cpu: {name}; {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}; flags: {present}")


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)



def resolve_precision(model: ModelConfig) -> Precision:
    """The device and dtype that `model.device` and `model.dtype` mean on this machine."""
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise InputError("model.device=cuda: no CUDA device is visible to torch on this machine")
    dtype = model.dtype
    if dtype == "auto":
        if device == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:  # torch's own kernel level too: ATEN_CPU_CAPABILITY=avx2 makes a bf16 CPU an AVX2 one for torch
            native = (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                      and any(flag in cpu_flags() for flag in _NATIVE_BF16_CPU_FLAGS))
        dtype = "bfloat16" if native else "float32"
    return Precision(device, dtype)
