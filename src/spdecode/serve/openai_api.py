"""OpenAI's request bodies (pydantic) and errors, turned into what the engine runs.

Parameters we do not implement are accepted when they carry their neutral value (what OpenAI
would do without them) and refused otherwise, so a client never gets a silently different answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.sampling import SamplingParams

# parameter -> the values that mean "not used"
NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "repetition_penalty": (1, 1.0, None),
    "logprobs": (False, None), "top_logprobs": (0, None), "echo": (False, None), "best_of": (1, None),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "min_tokens": (0, None), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "user": None, "stream_options": None,
}
MAX_STOPS = 16
MAX_STOP_CHARS = 1024  # a stop string is checked against the text's tail at every token


class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0: off
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]


def parse(cls: type[_Common], body: Any) -> _Common:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None
    for name, value in (req.model_extra or {}).items():
        if name not in NEUTRAL:
            raise ApiError(400, f"unsupported parameter {name!r}", name, "unsupported_parameter")
        allowed = NEUTRAL[name]
        if allowed is not None and value not in allowed:
            raise ApiError(400, f"{name}={value!r} is not supported (only its neutral value: "
                                f"{', '.join(map(repr, allowed))})", name, "unsupported_parameter")
    if req.n != 1:
        raise ApiError(400, "only n = 1 is supported", "n", "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options needs stream: true", "stream_options")
    return req


def stops_of(req: _Common) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings", "stop")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def sampling_of(req: _Common) -> SamplingParams:
    # top_p = 1 and top_k = 0 switch those filters off, as in SamplingParams.
    return SamplingParams(req.temperature, req.top_k, req.top_p, req.seed)


def chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as the chat template takes them (text parts joined)."""
    if not req.messages:
        raise ApiError(400, "messages must not be empty", "messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}].role {m.role!r} is not supported", f"messages.{i}.role")
        content = m.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, "only text content parts are supported", f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "the messages have no text", "messages")
    return out
