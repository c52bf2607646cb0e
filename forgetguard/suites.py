"""Suite references, as the server resolves them and the gate reads them: one grammar, one place.

A reference names a suite and, optionally, how to run it::

    general-qa                     the latest version
    general-qa@3                   version 3
    mmlu@sample=2000               a seeded sample of the latest mmlu, stratified by category
    mmlu@3,sample=2000,seed=1      the same from version 3, another seed
    mmlu@shots=5                   5 few-shot examples per item (benchmark suites)
    hellaswag@convention=lm-eval   scored as lm-eval does (multiple-choice benchmarks)
    forgetting-standard            a group: HellaSwag, ARC-Challenge and WinoGrande
    forgetting-standard@sample=500 each member with the same options

Options make a *derived* suite named after them (``mmlu.sample-2000``); the server registers
it like any suite (``app.suites.references``).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUPS: dict[str, tuple[str, ...]] = {
    # Biderman et al. 2024 ("LoRA Learns Less and Forgets Less") measure forgetting as the
    # mean of HellaSwag, ARC-Challenge and WinoGrande.
    "forgetting-standard": ("hellaswag", "arc-challenge", "winogrande"),
}
MAX_SAMPLE = 50_000
MAX_SHOTS = 64
OPTIONS = ("sample", "seed", "shots", "convention")


class InvalidReference(ValueError):
    """A suite reference that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class Reference:
    """A parsed reference: the suite's name, its version (None: latest), the options."""

    name: str
    version: int | None = None
    sample: int | None = None
    seed: int = 0
    shots: int | None = None
    convention: str | None = None

    @property
    def derived(self) -> bool:
        return (self.sample, self.shots, self.convention) != (None, None, None)

    @property
    def suite_name(self) -> str:
        """The name of the suite a run of this reference holds (``mmlu.5shot.sample-2000``)."""
        parts = [self.name]
        if self.convention is not None:
            parts.append(self.convention)
        if self.shots is not None:
            parts.append(f"{self.shots}shot")
        if self.sample is not None:
            parts.append(f"sample-{self.sample}")
            if self.seed:
                parts.append(f"seed-{self.seed}")
        return ".".join(parts)


def _int(ref: str, key: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidReference(
            f"{key} in {ref!r} must be an integer from {low} to {high}; got {value!r}"
        )
    return int(value)


def parse(ref: str) -> Reference:
    """``name[@version][,key=value…]`` (or ``name@key=value,…``) → a ``Reference``."""
    name, _, rest = ref.partition("@")
    fields: dict[str, int | str] = {}
    for part in rest.split(",") if rest else []:
        key, eq, value = part.partition("=")
        if not eq:
            fields["version"] = _int(ref, "the version", key, 1, 2**31 - 1)
        elif key == "sample":
            fields["sample"] = _int(ref, key, value, 1, MAX_SAMPLE)
        elif key == "seed":
            fields["seed"] = _int(ref, key, value, 0, 2**31 - 1)
        elif key == "shots":
            fields["shots"] = _int(ref, key, value, 0, MAX_SHOTS)
        elif key == "convention":
            fields["convention"] = value
        else:
            raise InvalidReference(
                f"unknown option {key!r} in {ref!r}; options: {', '.join(OPTIONS)}"
            )
    return Reference(name, **fields)  # type: ignore[arg-type]


def expand(ref: str) -> list[str]:
    """A group reference → its members' references, each with the group's options
    (``forgetting-standard@sample=500`` → ``hellaswag@sample=500``, …); else ``[ref]``."""
    name, at, rest = ref.partition("@")
    members = GROUPS.get(name)
    if members is None:
        return [ref]
    return [f"{member}{at}{rest}" for member in members]


def split_list(value: str) -> list[str]:
    """A comma-separated list of references: ``"mmlu@sample=20,seed=1,general-qa"`` is two
    (a ``key=value`` part belongs to the reference before it)."""
    out: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if out and "=" in part and "@" not in part:
            out[-1] += f",{part}"
        else:
            out.append(part)
    return out


def suite_names(ref: str) -> list[str]:
    """The names of the suites a run of ``ref`` holds (a group: each member's)."""
    return [parse(member).suite_name for member in expand(ref)]
