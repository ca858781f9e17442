#!/usr/bin/env bash
# One-shot set-up on a fresh machine or inside a virtual environment: the Fashion-MNIST system package (as
# root), PyTorch, and this package with its test extras, all into the active `python3`'s environment.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
  else
    echo "Fashion-MNIST system copy missing: run 'sudo apt-get install dataset-fashion-mnist'," \
         "or pass --data.init_args.source.root=DIR (idx .gz files), or let torchvision download it." >&2
  fi
fi

# clip-anytorch imports pkg_resources, which setuptools 81 and later no longer ship.
python3 -m pip install -q --upgrade pip "setuptools<81"
python3 -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install -q -e ".[test]"
