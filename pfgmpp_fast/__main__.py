import sys

from pfgmpp_fast.cli import main

sys.exit(main())
