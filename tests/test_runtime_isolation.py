"""runtime/ must import with torch, transformers and onnx unavailable (it ships without them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# tokenizers is a runtime dependency (CLIP's tokenizer for cdpruner, runtime.clip_text), so it is not blocked
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "safetensors", "sentencepiece")

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import runtime
    names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]
    for name in names:
        importlib.import_module(name)
    from runtime.strategies.registry import available
    available()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print(len(names))
    """
)


def run(blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = SCRIPT.format(blocked=blocked)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_runtime_imports_without_torch_or_transformers() -> None:
    result = run(BLOCKED)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 15  # every runtime module was imported


def test_negative_control_blocking_numpy_fails() -> None:
    """The blocker works: blocking a dependency the runtime really uses must fail."""
    result = run(("numpy",))
    assert result.returncode != 0 and "blocked import of numpy" in result.stderr
