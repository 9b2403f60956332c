import sys

from services.docker_proxy.main import main

sys.exit(main())
