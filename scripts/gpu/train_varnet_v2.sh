#!/bin/bash
# One device run: train the nextqsm-varnet-v2 section on the GPU with data workers, export into $OUT
# (checkpoint, loss log, model file + card, env.txt, train.log). The folder comes from scripts/gpu/prepare.sh.
# Env overrides for a CPU dry run: DEVICE=cpu WORKERS=2 MAXMIN=0.3 OUT=/tmp/out bash DEST/train_varnet_v2.sh
set -o pipefail
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-14}; MAXMIN=${MAXMIN:-7.5}; RUN=${RUN:-/tmp/run-v2}
G=$(cd "$(dirname "$0")" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 3
export PYTHONPATH="$G/src:/tmp/site"
{ nvidia-smi -L; nproc; free -g | head -2
  python3 -c "import torch, numpy, scipy, nilearn, nibabel; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'nilearn', nilearn.__version__)"
} 2>&1 | tee "$OUT/env.txt"
cd "$G/src" || exit 4
python3 -m qsmprep.training.cli qsmprep/training/configs/nextqsm.toml "$RUN" --section nextqsm-varnet-v2 \
  --device "$DEVICE" --threads 2 --workers "$WORKERS" --max-minutes "$MAXMIN" --quiet \
  --export nextqsm-varnet-v2 --export-dir "$OUT" 2>&1 | tee "$OUT/train.log"
rc=$?
cp "$RUN/loss.tsv" "$RUN/checkpoint.pt" "$OUT/" 2>/dev/null
tail -3 "$RUN/loss.tsv"
ls -la "$OUT"
exit $rc
