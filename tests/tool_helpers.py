"""Load a tools/*.py script as a module, for tests that call its functions in process."""
import importlib.util
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    """``tools/<name>.py`` as a fresh module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"ddl_tool_{name}", TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
