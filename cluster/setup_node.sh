#!/usr/bin/env bash
# Prepare one cluster node for dromo-ray; run by the cluster launcher's setup_commands after the file
# mounts are synced. Idempotent: `ray up` may run it again on a live node.
#
#   - a Python 3.11 virtualenv at $DROMO_VENV (default ~/dromo-venv), made with uv, whatever Python the
#     image ships;
#   - torch: the default PyPI wheel (CUDA) where nvidia-smi sees a GPU, the CPU wheel elsewhere;
#   - this repository ($DROMO_REPO, default ~/dromo_ray) installed editable, with its pinned Ray;
#   - ~/.dromo_env, sourced from ~/.bashrc: the venv, D4RL_DATASET_DIR, RAY_AUTH_MODE=token and the
#     MLflow tracking URI the start commands write to ~/.dromo_mlflow.
set -euo pipefail

REPO="${DROMO_REPO:-$HOME/dromo_ray}"
VENV="${DROMO_VENV:-$HOME/dromo-venv}"
PY_VERSION="${DROMO_PYTHON:-3.11}"
export PATH="$HOME/.local/bin:$PATH"

if ! command -v uv > /dev/null 2>&1; then
    curl -LsSf https://astral.sh/uv/install.sh | sh || python3 -m pip install --user --quiet uv
fi

if [ ! -x "$VENV/bin/python" ]; then
    uv venv --seed --python "$PY_VERSION" "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch" > /dev/null 2>&1; then
    if nvidia-smi -L > /dev/null 2>&1; then
        uv pip install --python "$VENV/bin/python" "torch>=2.4"
    else
        uv pip install --python "$VENV/bin/python" --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
    fi
fi
# torch is already satisfied, so the project's own requirements never swap the build chosen above.
uv pip install --python "$VENV/bin/python" -e "$REPO"

mkdir -p "$HOME/datasets" "$HOME/.ray"
if [ -f "$HOME/.ray/auth_token" ]; then
    chmod 600 "$HOME/.ray/auth_token"
fi

cat > "$HOME/.dromo_env" << EOF
# Written by cluster/setup_node.sh.
source "$VENV/bin/activate"
export D4RL_DATASET_DIR="$HOME/datasets"
export RAY_AUTH_MODE=token
if [ -f "$HOME/.dromo_mlflow" ]; then source "$HOME/.dromo_mlflow"; fi
EOF

if ! grep -qs "dromo_env" "$HOME/.bashrc"; then
    echo 'if [ -f "$HOME/.dromo_env" ]; then source "$HOME/.dromo_env"; fi' >> "$HOME/.bashrc"
fi
