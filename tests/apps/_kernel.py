"""A Jupyter kernel of this venv's Python for the notebook tests (one per test module: a
kernel start costs seconds)."""

import contextlib
import json
import sys


@contextlib.contextmanager
def started_kernel(folder):
    """Start a kernel found through a kernel spec written in ``folder`` (never the user's own
    kernels), and shut it down on exit. Yields the ``KernelManager``."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    (folder / "attnkit-test").mkdir()
    (folder / "attnkit-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnkit test", "language": "python"}))
    km = KernelManager(kernel_name="attnkit-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))
    km.start_kernel(extra_arguments=["--HistoryManager.enabled=False"])
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)
