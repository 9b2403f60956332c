"""Where the data bundled with the package lives.

The sample store ships inside the package (not beside it) so that a plain ``pip install`` gives
``stratorch run`` real candles to backtest on with no download and no database. Its provenance
and licence are in ``sample/NOTICE.md``; ``scripts/make-sample.sh`` rebuilds it.
"""

from pathlib import Path

#: A :class:`shared.candles.ParquetCandleStore` root holding 1h Binance spot candles of eight
#: USDT pairs, 2020-12-01 to 2021-07-17.
SAMPLE_STORE: Path = Path(__file__).parent / "sample"
