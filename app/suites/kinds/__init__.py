"""The suite kinds, one file each; importing this package registers every one of them.

Read the registry through here (``KINDS``, ``validate_suite``, ``SuiteDefinition``), so every
kind is registered before anything asks. Adding a kind is one file beside these and one
import line below.
"""

# The order of registration is the order of the kinds' parts in the /compare body and in the
# documented union of suite schemas: new kinds go last.
# isort: off
from app.suites.kinds import qa
from app.suites.kinds import checklist
from app.suites.kinds import multiple_choice
from app.suites.kinds import perplexity
from app.suites.kinds import mc_benchmark
from app.suites.kinds import gen_benchmark
from app.suites.kinds import ifeval

# isort: on
from app.suites.registry import KINDS, SuiteDefinition, validate_suite

__all__ = [
    "KINDS",
    "SuiteDefinition",
    "checklist",
    "gen_benchmark",
    "ifeval",
    "mc_benchmark",
    "multiple_choice",
    "perplexity",
    "qa",
    "validate_suite",
]
