"""``python -m galaxy_llava``: the CLI, so launchers can run it as a module
(``torchrun --nproc_per_node N -m galaxy_llava train ...``, ``accelerate launch -m galaxy_llava``)."""

import sys

from galaxy_llava.cli import main

sys.exit(main())
