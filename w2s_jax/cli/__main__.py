import sys

from w2s_jax.cli.app import main

sys.exit(main())
