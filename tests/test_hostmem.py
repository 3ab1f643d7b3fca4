"""The host allocator tuning (w2s_jax/core/hostmem.py): freed large blocks are reused without page faults."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from w2s_jax.core.hostmem import tune_host_malloc
    applied = tune_host_malloc()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    n = 256 << 20
    faults = []
    for _ in range(3):  # a 'step': allocate a big temporary, touch every page, free it
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        libc.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults)
    """
)


def _probe(mode: str):
    env = {"W2S_HOST_MALLOC": mode, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_blocks_are_reused_without_faults():
    pages = (256 << 20) // 4096
    applied, faults = _probe("system")
    assert not applied
    # glibc default: every 'step' maps the block afresh (one fault per 4 KiB page, fewer with THP)
    assert min(faults[1:]) > pages // 1000, faults
    applied, faults = _probe("reuse")
    assert applied
    assert faults[0] > pages // 1000  # the first touch faults as usual
    assert max(faults[1:]) < pages // 100, faults  # then the heap keeps the block: (almost) no faults
