"""Preamble for scripts that must run where this package cannot be imported (remote-code loading tests)."""

import textwrap

# Blocks `modeling_compressm` and `compressm_kernels`, and drops the checkout (sys.argv[1]) from sys.path.
BLOCK_PACKAGE = textwrap.dedent(
    r"""
    import importlib.abc, os, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_compressm", "compressm_kernels"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    repo_root = os.path.realpath(sys.argv[1])
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != repo_root]
    """
)
