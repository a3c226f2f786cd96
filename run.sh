#!/usr/bin/env bash
# The project's two jobs, each setting itself up first on a fresh machine:
#   ./run.sh train   train the default model on the bundled data set
#   ./run.sh test    run the test suite
# Everything installs into .venv in this checkout. Each job installs only what it needs: training
# on digits needs no torch (several GB), so `train` installs the package with its [train] extra
# and `test` adds the [test] extra (torch, torchvision, pytest) on top, whichever runs first.
set -euo pipefail
cd "$(dirname "$0")"

setup() {  # $1: the extra this job needs
    local stamp=".venv/.installed-$1"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # Reinstall only when the project's requirements changed since this extra was installed.
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        if [ "$1" = test ]; then
            # The torch pair whose builds import together (see the project README).
            .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
        fi
        .venv/bin/python -m pip install -q -e ".[$1]"
        touch "$stamp"
        if [ "$1" = test ]; then touch .venv/.installed-train; fi  # [test] includes [train]
    fi
}

case "${1:-}" in
    train) shift; setup train; exec .venv/bin/densenet-jax train --model densenet_40_k12 --dataset digits \
        --epochs 15 --batch-size 64 "$@" ;;
    test) shift; setup test; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./run.sh {train|test} [args...]" >&2; exit 2 ;;
esac
