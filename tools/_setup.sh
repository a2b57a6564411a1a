# Sourced by tools/demo.sh and tools/test.sh (one place for the set-up): a virtual environment with PyTorch and
# rankseg-monai installed, each step announced, pip's own progress shown.
#
#   EXTRAS   pip extras of rankseg-monai to install ("", "[test]" or "[test,nnunet]")
#   VENV     the virtual environment (default .venv)
#   TORCH    the PyTorch release to install when the environment has none (default 2.13.0)
#   TORCH_INDEX  where PyTorch comes from: PyTorch's CPU wheel index (the default), another wheel index (e.g.
#            https://download.pytorch.org/whl/cu126 for a CUDA build), or "default": the default package index
#            (on Linux x86_64 PyPI's torch is the CUDA build)
#
# PyTorch: a torch already in the environment is kept (e.g. the CUDA build a GPU user installed first, see
# README). Otherwise the CPU build comes from PyTorch's own CPU wheel index (a stock `pip install torch` on Linux
# is the CUDA build, several GB with its nvidia-* packages); when that index does not answer within seconds
# (a machine that reaches only PyPI or a mirror) the default index is used, and the script says which build
# that gave.
set -euo pipefail
VENV="${VENV:-.venv}"
TORCH="${TORCH:-2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
EXTRAS="${EXTRAS:-}"

_step() { printf '\n==> %s\n' "$*" >&2; }

_step "1/4 virtual environment $VENV"
if [ -x "$VENV/bin/python" ]; then echo "using the existing $VENV" >&2; else python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

_torch_build() {  # e.g. "torch 2.13.0+cpu (CPU-only build)"; fails when torch is not importable
    python -W ignore - <<'EOF'
import torch
kind = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
print(f"torch {torch.__version__} ({kind})")
EOF
}

_step "2/4 PyTorch"
build=""
if build="$(_torch_build 2>/dev/null)"; then
    echo "keeping the $build already in $VENV" >&2
elif [ "$TORCH_INDEX" = "default" ]; then
    echo "installing torch==$TORCH from the default package index (TORCH_INDEX=default) ..." >&2
    python -m pip install "torch==$TORCH"
elif echo "installing torch==$TORCH from $TORCH_INDEX ..." >&2 &&
     ! python -m pip install --index-url "$TORCH_INDEX" --timeout 10 --retries 0 "torch==$TORCH"; then
    echo "$TORCH_INDEX did not answer (or has no such torch); installing torch==$TORCH from the default package" \
         "index instead (on Linux x86_64 that can be the CUDA build, several GB)" >&2
    python -m pip install "torch==$TORCH"
fi
if [ -z "${build:-}" ]; then
    build="$(_torch_build)"
    echo "installed $build" >&2
fi

_step "3/4 rankseg-monai$EXTRAS and its dependencies (MONAI, nibabel, SimpleITK, ...)"
# the torch installed above stays: nnunetv2 (the nnunet extra) pulls timm -> torchvision, whose own torch pin
# would otherwise replace it (e.g. the CPU build by PyPI's CUDA build)
keep_torch="$(mktemp)"
python -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
python -m pip install -c "$keep_torch" -e ".$EXTRAS"
rm -f "$keep_torch"
echo "set-up done: $build; activate with '. $VENV/bin/activate'" >&2
