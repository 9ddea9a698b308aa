#!/usr/bin/env bash
# Bundles the release binary and plugins into dist/gpu-check (ignored by git, well under
# 64 MiB) with run.sh, which runs them on a machine whose Python has torch 2.11.0 with
# CUDA, against that torch's own libraries: doctor (CUDA seen), the plugin list, and the
# boundary self-check (autograd through a plugin) on cuda.
#
#   make gpu-bundle                  # here
#   dist/gpu-check/run.sh            # there (DEVICE=cpu to try it here; PYTHON=… to pick a python)
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
cargo build --release --workspace --exclude ferrotune-tests
out=dist/gpu-check
rm -rf "$out"
mkdir -p "$out/plugins"
cp target/release/ferrotune "$out/"
for so in target/release/lib*.so; do cp "$so" "$out/plugins/"; done
strip --strip-debug "$out/ferrotune" "$out"/plugins/*.so 2>/dev/null || true
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled ferrotune against the torch of this machine's python.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
echo "python torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
# LD_LIBRARY_PATH is searched before the binary's RUNPATH (which points at the build machine).
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$here/ferrotune" doctor
"$here/ferrotune" plugins
"$here/ferrotune" selfcheck --device "${DEVICE:-cuda}"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
ls -l "$out" "$out/plugins"
