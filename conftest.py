"""The pages' Python blocks as tests (README.md, docs/*.md): see tools/doc_examples.py."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "doc_examples", Path(__file__).parent / "tools" / "doc_examples.py")
doc_examples = sys.modules["doc_examples"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_examples)

pytest_collect_file = doc_examples.pytest_collect_file
