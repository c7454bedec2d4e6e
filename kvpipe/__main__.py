import os
import sys

# `python -m kvpipe` puts the current directory first on sys.path. Inside a kvpipe checkout that exposes the
# source folder `kernels/` as a top-level package, which transformers mistakes for Hugging Face's `kernels`
# package and fails to import. kvpipe itself is installed, so the current directory is not needed.
if sys.path and os.path.isfile(os.path.join(sys.path[0] or os.getcwd(), "kernels", "__init__.py")):
    sys.path.pop(0)

from kvpipe.cli import main  # noqa: E402

sys.exit(main())
