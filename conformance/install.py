"""`python -m conformance.install`: installs the pinned SGLang versions (`conformance.targets.sglang.install`)."""

import sys

from .targets.sglang import install as _install

if __name__ == "__main__":
    sys.exit(_install.main())
sys.modules[__name__] = _install
