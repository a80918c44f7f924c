"""The review API's wire format: the queue's query, a decision and its answer, a run's progress. Requests are strict
(unknown fields refused, every string capped); item ids never become paths (they are looked up in the index)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from cai.review.store import MAX_TEXT
from server.wire import StrictRequest, Wire, check_text

Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(check_text)]
SORTS = ("position", "id", "category", "status", "flags", "principle", "prompt")
STATUSES = ("todo", "unreviewed", "stale", "reviewed", "accepted", "rejected", "edited", "flipped", "tie", "conflict",
            "disagreement")
PER_PAGE = 50
MAX_PER_PAGE = 500


class QueueQuery(BaseModel):
    """What the queue shows: filters (each optional), the order, the page. ``status``: ``todo`` is unreviewed or
    needing review again (``stale``: its content changed since it was reviewed); ``reviewed`` is any decision that
    applies; ``disagreement``: reviewers differ."""

    kind: Literal["record", "preference"] | None = None
    flag: str | None = Field(default=None, max_length=100)            # a flag's name, "any" or "none"
    principle: str | None = Field(default=None, max_length=200)
    category: str | None = Field(default=None, max_length=200)
    status: Literal[STATUSES] | None = None                   # type: ignore[valid-type]
    reviewer: str | None = Field(default=None, max_length=200)        # items this reviewer decided
    q: str | None = Field(default=None, max_length=200)               # words of the prompt
    sort: Literal[SORTS] = "position"                         # type: ignore[valid-type]
    order: Literal["asc", "desc"] = "asc"
    page: int = Field(default=1, ge=1, le=1_000_000)
    per_page: int = Field(default=PER_PAGE, ge=1, le=MAX_PER_PAGE)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """The page's filter form sends every field, the unused ones empty (``kind=&flag=``): empty means any."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data

    def params(self, **change) -> dict[str, str]:
        """The query as URL parameters (defaults left out), with ``change`` applied."""
        values = {**self.model_dump(), **change}
        defaults = QueueQuery().model_dump()
        return {k: str(v) for k, v in values.items() if v is not None and v != "" and v != defaults.get(k)}


class DecisionRequest(StrictRequest):
    """One decision about one item. ``content_sha256`` is the digest of the content the reviewer saw (the page sends
    what it showed): a decision about content that has changed since is refused (409), never recorded against the
    new content. ``reviewer`` only on a server with no API keys (there the key names the reviewer)."""

    decision: Literal["accept", "reject", "edit", "flip", "tie"]
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    text: Text | None = None                                  # the edited final text (edit)
    reason: Text | None = None                                # why (reject; optional otherwise)
    reviewer: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[\w .@+-]+$")] | None = None


class Progress(Wire):
    items: int
    reviewed: int
    stale: int
    conflicts: int                                            # items whose reviewers disagree


class DecisionResponse(Wire):
    id: str
    kind: str
    decision: str
    reviewer: str
    at: str
    status: str                                               # the item's outcome now, every reviewer counted
    decisions: dict[str, str]                                 # reviewer → decision, on the current content
    progress: Progress


class QueueRow(Wire):
    id: str
    kind: str
    category: str
    flags: list[str]
    principles: list[str]
    prompt: str
    status: str
    decisions: dict[str, str]


class QueuePage(Wire):
    run: str
    total: int                                                # rows matching the filters
    page: int
    pages: int
    per_page: int
    rows: list[QueueRow]
    progress: Progress


class RunStatus(Wire):
    run: str
    path: str
    records: int
    preferences: int
    progress: Progress
    by_status: dict[str, int]
    reviewers: list[str]
    agreement: dict[str, dict[str, float | int]]              # "a | b" → {"items", "agree"}
    disagreements: list[str]
