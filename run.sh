#!/usr/bin/env bash
# The project's two jobs, each setting itself up first on a fresh machine:
#   ./run.sh train   train the default model on the bundled data set
#   ./run.sh test    run the test suite
# Everything installs into .venv in this checkout.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # Reinstall only when the project's requirements changed since the last set-up.
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        # The torch pair whose builds import together (see the project README).
        .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
        .venv/bin/python -m pip install -q -e ".[test]"
        touch .venv/.installed
    fi
}

case "${1:-}" in
    train) shift; setup; exec .venv/bin/densenet-jax train --model densenet_40_k12 --dataset digits \
        --epochs 15 --batch-size 64 "$@" ;;
    test) shift; setup; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./run.sh {train|test} [args...]" >&2; exit 2 ;;
esac
