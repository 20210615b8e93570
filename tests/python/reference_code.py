"""Reference prompt-building and tokenizer code of older chat models, loaded file by file from the PyPI package
modelscope (1.9.5, installed without dependencies by scripts/setup.sh): its package __init__ pulls in a hub client and
pandas, so single files are executed on their own, with the few modelscope helpers they import stubbed."""
import importlib.util
import logging
import sys
import types
from pathlib import Path


def modelscope_root() -> Path:
    spec = importlib.util.find_spec("modelscope")
    assert spec is not None, "the modelscope package is missing (scripts/setup.sh installs it)"
    return Path(spec.submodule_search_locations[0])


def load_modelscope_file(relpath: str, name: str):
    """Executes modelscope/<relpath> as module `name`; `from modelscope.utils.logger import get_logger` is served by a
    stub while it runs (nothing else of modelscope is imported)."""
    path = modelscope_root() / relpath
    stub_names = ["modelscope", "modelscope.utils", "modelscope.utils.logger"]
    saved = {n: sys.modules.get(n) for n in stub_names}
    logger_mod = types.ModuleType("modelscope.utils.logger")
    logger_mod.get_logger = lambda *a, **k: logging.getLogger("modelscope-reference")
    sys.modules["modelscope"] = types.ModuleType("modelscope")
    sys.modules["modelscope.utils"] = types.ModuleType("modelscope.utils")
    sys.modules["modelscope.utils.logger"] = logger_mod
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
