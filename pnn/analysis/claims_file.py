"""Claims as config: the YAML files that state hypotheses about the runs, read and checked.

A claims file holds a ``claims:`` list; each claim has an ``id``, an optional ``statement``,
sides ``a`` and ``b``, a ``kind`` (``below``, ``at_least``, ``within``, ``above``) and a
``threshold`` for ``a − b`` (best test accuracy, percentage points), and optionally
``comparable_only``. A side is an experiment (file name or short id), a mapping of
``experiment`` plus config filters, or a list of those (a group). The format, with an example,
is docs/analysis.md's "Claims files".

:func:`load_claims` checks a file against the conf/ experiments and the runs at hand, and
raises :class:`pnn.analysis.runs.AnalysisError` with one line naming the file, the claim and
the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pandas as pd
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from pnn.analysis.runs import CONFIG_PREFIX, AnalysisError
from pnn.config import CONF_DIR

README_CLAIMS = CONF_DIR / "claims" / "readme.yaml"
# diff < t, diff >= t, |diff| < t, diff > t
Kind = Literal["below", "at_least", "within", "above"]
KINDS: tuple[str, ...] = get_args(Kind)
KIND_TEXT = {"below": "<", "at_least": ">=", "within": "within ±", "above": ">"}


class _Side(BaseModel):
    """``{experiment: NAME, KEY: VALUE, ...}``: the experiment's runs with those config values."""

    model_config = ConfigDict(extra="allow")
    experiment: str


SIDE = "a side is an experiment, {experiment: NAME, KEY: VALUE, ...} or a non-empty list of these"
# A side, read as a list of members (one member alone is a list of one).
_listed = BeforeValidator(lambda v: v if isinstance(v, list) else [v])
_Sides = Annotated[list[str | _Side], _listed, Field(min_length=1, description=SIDE)]
_Points = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _ClaimNode(BaseModel):
    """A claim as written; a refused field is told its ``description`` and the value it got."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, description="a non-empty string is needed")
    statement: str | None = Field(None, description="a line of text")
    a: _Sides
    b: _Sides
    kind: Kind = Field(description=f"one of {', '.join(KINDS)}")
    threshold: _Points = Field(description="a number of percentage points is needed")
    comparable_only: bool = Field(False, strict=True, description="true or false")


@dataclass(frozen=True)
class Member:
    """One experiment's runs, those whose config matches every ``key = value`` of ``where``."""

    experiment: str
    where: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        if not self.where:
            return self.experiment
        return f"{self.experiment} ({', '.join(f'{k}={v}' for k, v in self.where)})"


@dataclass(frozen=True)
class Claim:
    """``a − b`` lies on the claimed side of ``threshold`` (``kind``) for every pair of members."""

    id: str
    a: tuple[Member, ...]
    b: tuple[Member, ...]
    kind: str
    threshold: float
    statement: str
    comparable_only: bool = False
    source: str = ""  # the file it came from


def short_id(experiment: str) -> str:
    """``e3_original_first3x3`` -> ``e3``; other names as they are."""
    head = experiment.split("_", 1)[0]
    return head if head[:1] == "e" and head[1:].isdigit() else experiment


def short_label(label: str) -> str:
    """A member's label with its experiment's short id: ``e7 (noise.level=0.05)``."""
    name, _, rest = label.partition(" ")
    return short_id(name) + (f" {rest}" if rest else "")


def known_experiments(runs: pd.DataFrame) -> list[str]:
    """The experiments a claim may name: conf/experiment/ files and those in the runs."""
    files = [p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
    return list(dict.fromkeys([*files, *runs["experiment"].astype(str)]))


class _Reader:
    """Reads one file's claims; ``fail`` names the file, the claim and the field."""

    def __init__(self, path: Path, runs: pd.DataFrame) -> None:
        self.path, self.runs = path, runs
        self.known = known_experiments(runs)
        self.claim = ""

    def fail(self, field: str, message: str) -> AnalysisError:
        where = f"claims file {self.path}, claim {self.claim}"
        return AnalysisError(f"{where}, field {field}: {message}")

    def experiment(self, field: str, name: str) -> str:
        if name in self.known:
            return name
        matches = [e for e in self.known if short_id(e) == name]
        if len(matches) == 1:
            return matches[0]
        shown = ", ".join(self.known[:12]) + (", ..." if len(self.known) > 12 else "")
        raise self.fail(field, f"unknown experiment {name!r}; known: {shown}")

    def member(self, field: str, node: str | _Side) -> Member:
        if isinstance(node, str):
            return Member(self.experiment(field, node))
        where = []
        for key, value in (node.model_extra or {}).items():
            key = str(key).removeprefix(CONFIG_PREFIX)
            if CONFIG_PREFIX + key not in self.runs.columns:
                raise self.fail(field, f"no run has the config key {key!r}")
            where.append((key, str(value)))  # as MLflow logged it: the str() of the value
        return Member(self.experiment(field, node.experiment), tuple(where))

    def refused(self, node: Any, error: ValidationError) -> AnalysisError:
        loc, fields = error.errors()[0]["loc"], _ClaimNode.model_fields
        if not loc:
            return self.fail("id", f"each claim is a mapping of {', '.join(fields)} (got {node!r})")
        if (field := str(loc[0])) not in fields:
            return self.fail(field, f"unknown field; allowed: {', '.join(fields)}")
        got = repr(node[field]) if field in node else "missing"
        if field == "kind" and field in node:
            return self.fail(field, f"unknown kind {got}; allowed: {', '.join(KINDS)}")
        return self.fail(field, f"{fields[field].description} (got {got})")

    def read(self, index: int, node: Any) -> Claim:
        self.claim = str(node["id"]) if isinstance(node, dict) and node.get("id") else f"#{index}"
        try:
            valid = _ClaimNode.model_validate(node)
        except ValidationError as error:
            raise self.refused(node, error) from None
        a, b = (tuple(self.member(f, m) for m in getattr(valid, f)) for f in "ab")
        statement = valid.statement or (
            f"{' | '.join(m.label for m in a)} − {' | '.join(m.label for m in b)} "
            f"{KIND_TEXT[valid.kind]} {valid.threshold:g}"
        )
        fields = valid.kind, valid.threshold, statement, valid.comparable_only
        return Claim(self.claim, a, b, *fields, str(self.path))


def load_claims(path: Path, runs: pd.DataFrame) -> list[Claim]:
    """The claims of one file, checked against the conf/ experiments and ``runs``."""
    reader = _Reader(path, runs)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as err:
        raise AnalysisError(f"claims file {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        first = str(err).replace("\n", " ")
        raise AnalysisError(f"claims file {path}: not valid YAML ({first})") from None
    if not isinstance(document, dict) or not isinstance(document.get("claims"), list):
        raise AnalysisError(f"claims file {path}: expected a top-level 'claims:' list")
    return [reader.read(i, node) for i, node in enumerate(document["claims"], start=1)]


def load_all(paths: list[Path], runs: pd.DataFrame) -> list[Claim]:
    """The README's claims, then each file's in order; a claim id used twice is an error."""
    claims: list[Claim] = []
    for path in [README_CLAIMS, *paths]:
        for claim in load_claims(path, runs):
            twin = next((c for c in claims if c.id == claim.id), None)
            if twin is not None:
                raise AnalysisError(
                    f"claims file {path}, claim {claim.id}, field id: already used in "
                    f"{twin.source}; give it another id"
                )
            claims.append(claim)
    return claims
