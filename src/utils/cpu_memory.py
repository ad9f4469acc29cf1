"""Training on the CPU: keep the memory a step frees for the next step. Each step allocates and frees the same
activation buffers. By default glibc's malloc returns a freed buffer above its mmap threshold to the OS, and trims
the top of its heap once more than twice that threshold is free there; so the next step faults every page back in
and the kernel zeroes it again: 8,000-21,000 page faults per step of the 9.2M-parameter Flux at 512 px (none once
the memory is kept), and kept steps took 0.95 of the time (median of 6 pairs of processes: benchmarks/cpu_memory.py)."""
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: larger buffers still go back to the OS at once
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
