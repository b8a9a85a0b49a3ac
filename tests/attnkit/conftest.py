"""Fixtures shared by the library's tests: ``chunked_impl`` runs a test on both of chunked's
implementations (the C++ kernel and the PyTorch block loop)."""

import json
import os
import subprocess
import sys

import pytest

from attnkit.backends import _ext, _kernel, chunked


def kernel_skip_reason() -> str | None:
    """None when the C++ kernel is loaded (built by ``make``), else why the kernel half of a
    test cannot run."""
    if _kernel.module() is None:
        return f"the C++ attention kernel is not available: {_kernel.status().describe()}"
    return None


@pytest.fixture(params=["kernel", "torch"])
def chunked_impl(request):
    """Run the test with chunked's C++ kernel, then with its PyTorch block loop."""
    if request.param == "kernel":
        why = kernel_skip_reason()
        if why:
            pytest.skip(why)
    with chunked.use_implementation(request.param):
        yield request.param


# --- the kernel as other CPUs build it --------------------------------------------------------

_TARGET_BUILDS: dict = {}
_FIRST_CALL = ("import torch, attnkit; from attnkit.backends import _kernel; "
               "q = torch.randn(1, 2, 70, 8); "
               "attnkit.attention(q, q, q, causal=True, backend='chunked'); "
               "s = _kernel.status(); print('STATUS', s.state, s.target, s.path)")


def target_build(target: str, tmp_path_factory):
    """Build the kernel for ``target`` once per test session the way a pip user's first call
    does (a fresh cache directory, no development build), and return
    ``(env for subprocesses that run that build, the first call's CompletedProcess)``.

    Under pytest-xdist the workers share the cache and the first call's record (a lock
    file orders them): the build runs once per session, not once per worker."""
    if target not in _TARGET_BUILDS:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the session's directory, above each worker's own
        cache = root / f"attnkit-cache-{target}"
        cache.mkdir(exist_ok=True)
        env = {**os.environ, "ATTNKIT_CACHE_DIR": str(cache),
               "ATTNKIT_BUILD_DIR": str(cache / "no-development-build"),
               "ATTNKIT_KERNEL_TARGET": target, "ATTNKIT_RATES": "default"}
        if target == "default":
            env["ATEN_CPU_CAPABILITY"] = "default"
        record = cache / "first-call.json"
        with _ext._FileLock(cache / ".first-call.lock"):
            if not record.exists():
                proc = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env,
                                      capture_output=True, text=True, timeout=900)
                record.write_text(json.dumps([proc.returncode, proc.stdout, proc.stderr]))
        code, out, err = json.loads(record.read_text())
        _TARGET_BUILDS[target] = (env, subprocess.CompletedProcess(_FIRST_CALL, code, out, err))
    return _TARGET_BUILDS[target]


@pytest.fixture(scope="session")
def target_builds(tmp_path_factory):
    """``build(target) -> (env, first call)``: see :func:`target_build`."""
    return lambda target: target_build(target, tmp_path_factory)
