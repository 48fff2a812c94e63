"""Load a script (tools/*.py, datasets/*.py) as a module, for tests that call its functions in process."""
import importlib.util
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    """``tools/<name>.py`` as a fresh module (tools/ is a folder of scripts, not a package)."""
    return load_script(TOOLS_DIR / f"{name}.py")


def load_script(path):
    """The script at ``path`` (``tools/*.py``, ``datasets/make_synthetic_ddl.py``) as a fresh module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"ddl_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
