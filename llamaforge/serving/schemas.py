"""The request bodies of `llamaforge serve`'s endpoints as pydantic models, built on first use (the CLI
imports the serving modules for their flags, and pydantic is imported only when a server starts).

Fields follow the OpenAI API reference, with llama.cpp's and vLLM's extensions where clients use
them (`top_k`, `min_p`, `repetition_penalty`, `grammar`, top-level `json_schema`, /tokenize's
`content` and `prompt`). Unknown fields are ignored; NaN and infinities are refused.
"""
MAX_N = 8  # most choices per prompt


def schemas() -> dict:
    """{name: pydantic model} for each request body: ChatRequest, CompletionRequest, EmbeddingRequest,
    TokenizeRequest, DetokenizeRequest."""
    global _SCHEMAS
    if _SCHEMAS is not None:
        return _SCHEMAS
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Base(BaseModel):
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    class Request(Base):
        @model_validator(mode="before")
        @classmethod
        def _unicode(cls, data):
            where = invalid_unicode(data)
            if where is not None:
                raise ValueError(f"'{where}' is not valid Unicode: it holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
            return data

    class TextPart(Base):
        type: Literal["text"]
        text: str

    class FunctionCall(Base):
        name: str
        arguments: str = "{}"

    class ToolCall(Base):
        id: str | None = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class Message(Base):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = Field(None, max_length=64)
        tool_call_id: str | None = None

    class StreamOptions(Base):
        include_usage: bool = False

    class JSONSchemaFormat(Base):
        name: str | None = None
        description: str | None = None
        schema_: dict | None = Field(None, alias="schema")
        strict: bool | None = None

    class ResponseFormat(Base):
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JSONSchemaFormat | None = None

    class FunctionDef(Base):
        name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
        description: str | None = None
        parameters: dict | None = None
        strict: bool | None = None

    class Tool(Base):
        type: Literal["function"]
        function: FunctionDef

    class FunctionName(Base):
        name: str

    class NamedToolChoice(Base):
        type: Literal["function"]
        function: FunctionName

    class Sampling(Request):
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0, le=1_000_000)
        repetition_penalty: float | None = Field(None, gt=0, le=10)
        presence_penalty: float | None = Field(None, ge=-2, le=2)
        frequency_penalty: float | None = Field(None, ge=-2, le=2)
        min_p: float | None = Field(None, ge=0, lt=1)
        logit_bias: dict[str, float] | None = Field(None, max_length=1024, description="token id -> bias in -100..100")
        seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
        stop: str | list[str] | None = Field(None, max_length=16)
        n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt; they share the prompt's prefill")
        response_format: ResponseFormat | None = None
        grammar: str | None = Field(None, max_length=100_000, description="a Lark or GBNF grammar (llama.cpp's extension)")
        json_schema: dict | None = Field(None, description="a JSON schema (llama.cpp's extension)")
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1, le=10_000_000)
        max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)
        tools: list[Tool] | None = Field(None, max_length=128)
        tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
        parallel_tool_calls: bool = True

    class CompletionRequest(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text, texts, token ids or lists of token ids")
        max_tokens: int = Field(16, ge=0, le=10_000_000)
        echo: bool = False
        logprobs: int | None = Field(None, ge=0, le=20)
        suffix: None = None
        best_of: int = Field(1, ge=1, le=1)

    class TokenizeRequest(Request):
        model: str | None = None
        content: str | None = Field(None, description="llama.cpp's field")
        prompt: str | None = Field(None, description="vLLM's field")
        messages: list[Message] | None = Field(None, min_length=1, description="vLLM's chat form: the prompt of these messages")
        add_special: bool | None = None
        add_special_tokens: bool | None = None
        with_pieces: bool = False

    class DetokenizeRequest(Request):
        model: str | None = None
        tokens: list[int] = Field(max_length=1_000_000)

    class EmbeddingRequest(Request):
        model: str | None = None
        input: str | list[str] = Field(description="a text or a list of texts")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(None, ge=1, le=4096)
        user: str | None = None

    _SCHEMAS = dict(ChatRequest=ChatRequest, CompletionRequest=CompletionRequest, EmbeddingRequest=EmbeddingRequest,
                    TokenizeRequest=TokenizeRequest, DetokenizeRequest=DetokenizeRequest)
    return _SCHEMAS


_SCHEMAS = None


def invalid_unicode(body) -> str | None:
    """Where in a parsed JSON body a string holds a lone surrogate (JSON's "\\ud800" escapes make them; no
    tokenizer can encode one), as 'messages[0].content'; None if nowhere."""
    stack = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # the path may hold a bad key too: pydantic cannot carry a message with one
                return (where or "body").encode("utf-8", "backslashreplace").decode()
        elif isinstance(value, dict):
            stack += [(v, f"{where}.{k}".lstrip(".")) for k, v in value.items() if isinstance(k, str)]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return None
