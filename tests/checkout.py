"""Pin `diffedit_engine` to the checkout these tests live in (the same four lines as cli.py's script start): the
tests test this tree, not whichever copy is installed (another worktree's editable install, or a wheel)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use(root: Path = ROOT) -> None:
    # the checkout's folders are subpackages, not top-level names (`python -m pytest` puts the working directory
    # first on sys.path: Hugging Face's `kernels`, which transformers imports, must not resolve to ours)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    mod = sys.modules.get("diffedit_engine")
    if mod is not None and list(getattr(mod, "__path__", [])) == [str(root)]:
        return
    spec = importlib.util.spec_from_loader("diffedit_engine", loader=None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    sys.modules["diffedit_engine"] = importlib.util.module_from_spec(spec)


use()
