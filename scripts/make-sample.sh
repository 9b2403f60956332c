#!/usr/bin/env bash
# Rebuild stratorch/sample/, the candle store bundled with the package, from the
# NostalgiaForInfinity 1h CSVs (Binance kline layout). Where the data comes from and under
# which terms: stratorch/sample/NOTICE.md (kept as is; only stratorch/sample/1h/ is rebuilt).
#
# usage: scripts/make-sample.sh DIR
#   DIR holds <SYMBOL>-1h.csv for the eight symbols below, e.g. data/real/binance/nfi.
#   PYTHON picks the interpreter (default: the repo's .venv, else python3).
#
# The files are built in a temporary store and swapped in only when all eight ingested.
set -euo pipefail

SYMBOLS=(BTCUSDT ETHUSDT SOLUSDT ADAUSDT XRPUSDT DOGEUSDT LINKUSDT LTCUSDT)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

if [[ $# -ne 1 || ! -d $1 ]]; then
    echo "usage: $0 DIR   (DIR holds ${SYMBOLS[*]/%/-1h.csv})" >&2
    exit 2
fi
src="$(cd "$1" && pwd)"
for symbol in "${SYMBOLS[@]}"; do
    [[ -f $src/$symbol-1h.csv ]] || { echo "missing $src/$symbol-1h.csv" >&2; exit 1; }
done

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

(cd "$repo" && "$python" - "$src" "$build" "${SYMBOLS[@]}") <<'PY'
import sys
from pathlib import Path

from shared.candles import ParquetCandleStore, ingest_binance

src, candles, symbols = Path(sys.argv[1]), ParquetCandleStore(Path(sys.argv[2])), sys.argv[3:]
for symbol in symbols:
    report = ingest_binance([src / f"{symbol}-1h.csv"], symbol=symbol, interval="1h", candles=candles)
    print(f"{symbol}: {report.rows_written} bars", file=sys.stderr)
PY

sample="$repo/stratorch/sample"
mkdir -p "$sample"
rm -rf "$sample/1h"
mv "$build/1h" "$sample/1h"
du -ch "$sample"/1h/*.parquet | tail -n 1 >&2
