"""The OpenAI-compatible chat route: it fetches the chat handler and calls it; the HTTP matters are the response
kind (JSON or server-sent events) and the client going away."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.deps import JSON_WORK, Chat
from server.errors import ERROR_RESPONSES
from server.openai.protocol import ChatCompletion, ChatCompletionRequest
from server.responses import EventStreamResponse, json_response, until_disconnected

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=JSON_WORK, responses=ERROR_RESPONSES, response_model=ChatCompletion,
             summary="a chat completion (plain, or streamed as server-sent ChatCompletionChunk events)")
async def chat_completions(body: ChatCompletionRequest, chat: Chat, request: Request) -> Response:
    if body.stream:
        return EventStreamResponse(await until_disconnected(request, chat.stream(body)))
    return json_response(await until_disconnected(request, chat.complete(body)))
