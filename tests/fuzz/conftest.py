"""Hypothesis profiles for the property tests in this package.

`standing` (the default, inside `make test`): a bounded, derandomized run, so the suite stays
a few seconds per property and CI sees the same examples every time (the known hostile inputs
are explicit `@example`s, run first whatever the profile). `fuzz` (`make fuzz`, or
`EXTPROC_FUZZ=1`): random and long, to find what the standing run does not;
`EXTPROC_FUZZ_EXAMPLES` sets how many examples per property.

No example database (and Hypothesis' other files go to the system's temp directory): the tests
must not write into the work tree, and a failure prints its falsifying example (and, with
`print_blob`, a `@reproduce_failure` line to replay it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps caches (constants read from the source) under `.hypothesis/` in the working
# directory even without an example database: outside the work tree instead.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "extproc-hypothesis")

# The properties build inputs up to megabytes and tens of thousands of nesting levels on
# purpose; one shared pipeline per test is reused across examples where the test says so.
_SUPPRESSED = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.function_scoped_fixture,
]

settings.register_profile(
    "standing",
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("EXTPROC_FUZZ_EXAMPLES", "3000")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.load_profile("fuzz" if os.environ.get("EXTPROC_FUZZ") else "standing")
