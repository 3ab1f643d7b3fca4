import sys

from w2s_jax.cli.main import main

sys.exit(main())
