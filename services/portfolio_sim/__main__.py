import sys

from services.portfolio_sim.main import main

sys.exit(main())
