"""``python -m devastator``: the same as bin/devastator."""
from gevent import monkey

monkey.patch_all()  # before pykka or anything else imports threading

import sys  # noqa: E402

from devastator.cli import main  # noqa: E402

sys.exit(main())
