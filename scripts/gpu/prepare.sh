#!/bin/bash
# Build the folder that travels to a GPU machine without qsmprep's extra dependencies (no network there):
#   bash scripts/gpu/prepare.sh DEST      (e.g. DEST=.gpu in the checkout that the device tool sends; ignore it
#                                          in .git/info/exclude and name it in the tool's carry)
# DEST/src: this checkout's qsmprep package (tracked and untracked files, no tests); DEST/whl: wheels of nibabel and
# nilearn (the head phantom reads nilearn's bundled MNI templates; the rest of what training imports -- torch, numpy,
# scipy, pandas, scikit-learn, numba -- is assumed there); DEST/train_varnet_v2.sh: the training run.
# Then, on the device: bash DEST/train_varnet_v2.sh  (OUT set; DEVICE/WORKERS/MAXMIN/RUN override the defaults;
# a CPU dry run here: DEVICE=cpu WORKERS=2 MAXMIN=0.3 OUT=/tmp/out bash DEST/train_varnet_v2.sh).
set -eu
dest=${1:?usage: prepare.sh DEST}
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$dest/src" && mkdir -p "$dest/src" "$dest/whl"
(cd "$root" && git ls-files -co --exclude-standard qsmprep | grep -v /tests/ | tar cf - -T -) | (cd "$dest/src" && tar xf -)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dest/whl" nibabel==5.4.2 nilearn==0.14.1
cp "$root/scripts/gpu/train_varnet_v2.sh" "$dest/"
du -sh "$dest"
