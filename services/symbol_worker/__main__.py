import sys

from services.symbol_worker.main import main

sys.exit(main())
