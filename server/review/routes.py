"""The review page's routes: HTML pages for people, a JSON API under ``/review/api`` that the page's script (and any
client) uses, the page's two static files, and the session that lets a browser view pages. Each fetches the review
handler and calls it; the routes are plain functions (FastAPI runs them in its thread pool: a decision waits for its
fsync, and a changed run folder is read again, without holding up the event loop).

Every route needs the API key (the guard). A decision needs it in the ``Authorization`` header: the session cookie
only lets a browser view pages (see ``server.security.Sessions``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from server.deps import JSON_WORK, Review, Reviewer, State
from server.errors import ERROR_RESPONSES, InvalidRequest, NotFound
from server.responses import AsciiJSONResponse
from server.review import pages
from server.review.protocol import DecisionRequest, DecisionResponse, QueuePage, QueueQuery, RunStatus
from server.review.serving import ai_label
from server.security import SESSION_COOKIE

router = APIRouter(responses=ERROR_RESPONSES)
Filters = Annotated[QueueQuery, Query()]


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(text, headers=pages.HEADERS)


def _who(state, reviewer: str | None) -> dict:
    return {"reviewer": reviewer, "keys": bool(state.settings.api_keys)}


# -- the JSON API (first: its paths must not be taken for a run's pages) ---------------------------------------------


@router.post("/review/session", summary="let this browser view the review pages (sets an HttpOnly cookie)")
def session(request: Request, state: State, reviewer: Reviewer) -> Response:
    response = AsciiJSONResponse(_who(state, reviewer))
    if state.sessions is not None:
        from server.security import bearer_token, matching_key

        token = bearer_token(request.scope.get("headers", []))
        key = matching_key(token, list(state.settings.api_keys)) if token else None
        if key is not None:          # only the header's key opens a session (a cookie cannot renew itself)
            response.set_cookie(SESSION_COOKIE, state.sessions.token(key), httponly=True, samesite="strict",
                                secure=request.url.scheme == "https", path="/review")
    return response


@router.get("/review/api/runs", summary="the runs this server shows, with their progress")
def api_runs(review: Review) -> list[RunStatus]:
    return [review.status(name) for name in review.names()]


@router.get("/review/api/{run}/queue", response_model=QueuePage)
def api_queue(run: str, review: Review, q: Filters) -> QueuePage:
    return review.queue(run, q)


@router.get("/review/api/{run}/status", response_model=RunStatus)
def api_status(run: str, review: Review) -> RunStatus:
    return review.status(run)


@router.get("/review/api/{run}/items/{item_id}", summary="one record or pair, its digest and its outcome")
def api_item(run: str, item_id: str, review: Review) -> dict:
    view = review.item(run, item_id, QueueQuery())
    o = view.item.outcome
    body = view.record.to_json() if view.record is not None else view.pair.to_json()  # type: ignore[union-attr]
    return {"id": item_id, "kind": view.item.kind, "content_sha256": view.item.digest, "status": o.status,
            "decisions": o.decisions, "item": body}


@router.post("/review/api/{run}/items/{item_id}/decision", dependencies=JSON_WORK, response_model=DecisionResponse)
def decide(run: str, item_id: str, body: DecisionRequest, review: Review, state: State,
           reviewer: Reviewer) -> DecisionResponse:
    if state.settings.api_keys:
        if reviewer is None:                      # the guard let the request in, so this cannot be
            raise InvalidRequest("no API key in the Authorization header", None, "invalid_api_key")
        if body.reviewer is not None and body.reviewer != reviewer:
            raise InvalidRequest(f"the reviewer is who holds the API key ({reviewer}); leave reviewer out",
                                 "reviewer", "reviewer_mismatch")
        who = reviewer
    elif body.reviewer is None:
        raise InvalidRequest("this server has no API keys: name the reviewer (the page asks for a name once)",
                             "reviewer", "missing_reviewer")
    else:
        who = body.reviewer.strip()
    return review.decide(run, item_id, body, who)


# -- the page's files ----------------------------------------------------------------------------------------------


@router.get("/review/static/{asset}", summary="the page's script and style")
def static(asset: str) -> Response:
    try:
        data = pages.asset(asset)
    except KeyError:
        raise NotFound(f"no such file {asset!r}", "asset", "not_found") from None
    return Response(data, media_type=pages.ASSETS[asset],
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


# -- the pages ---------------------------------------------------------------------------------------------------


@router.get("/review", response_class=HTMLResponse, summary="the runs to review")
def runs_page(review: Review, state: State, reviewer: Reviewer) -> HTMLResponse:
    runs = [review.status(name) for name in review.names()]
    return _html(pages.render("runs.html", runs=runs, **_who(state, reviewer)))


@router.get("/review/{run}", response_class=HTMLResponse, summary="a run's queue")
def queue_page(run: str, review: Review, state: State, reviewer: Reviewer, q: Filters) -> HTMLResponse:
    page = review.queue(run, q)
    return _html(pages.render("queue.html", run=run, page=page, query=q, choices=review.choices(run),
                              status=review.status(run), **_who(state, reviewer)))


@router.get("/review/{run}/items/{item_id}", response_class=HTMLResponse, summary="one record or pair")
def item_page(run: str, item_id: str, review: Review, state: State, reviewer: Reviewer, q: Filters) -> HTMLResponse:
    view = review.item(run, item_id, q)
    template = "record.html" if view.record is not None else "pair.html"
    label = ai_label(view.pair) if view.pair is not None else None
    return _html(pages.render(template, run=run, view=view, label=label, **_who(state, reviewer)))
