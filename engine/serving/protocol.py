"""Request and response bodies of OpenAI's API (the subset kvlab serves), as pydantic models (the
responses' in ``engine.serving.response_models``).

Requests are validated strictly: ``"10"`` is not an integer, ``"yes"`` not a boolean and
``NaN`` or ``Infinity`` not a number (JSON integers are accepted for numbers and, as JSON
Schema's ``integer`` has it, ``10.0`` for integers). Known fields that the engine cannot honour
(tools, response formats, logit_bias, suffix, vLLM's ``spaces_between_special_tokens=false``, ...) are
rejected with a 400 naming the field rather than silently dropped, and the published schema
lists only the values that are accepted (``null``, or the neutral value). ``top_k``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``repetition_penalty``, ``min_p``,
``include_stop_str_in_output`` and ``skip_special_tokens`` are vLLM's extensions (clients send them through
``extra_body``); benchmarks need ``ignore_eos``.

Unknown top-level request fields: one that is a near miss of a field of the request
(``max_token``, ``temprature``, ``maxTokens``) is a 400 naming it and the field meant, as
OpenAI answers an unrecognized argument; any other (fields of OpenAI's or vLLM's API this
server does not model, such as ``metadata``, ``store`` or ``prompt_logprobs``, or a client's
own) is accepted and ignored, as vLLM does, and named in the response's
``X-Kvlab-Ignored-Fields`` header (and once per name in the server log; see
``misspelt_field``, ``FOREIGN_FIELDS``). Inside a message or ``stream_options`` a near miss
(``contnet``, ``include_usge``) is a 400 too, blaming the top-level field that holds it.

Every validation error names the top-level field at fault: field errors through their
location, cross-field errors through ``ctx["param"]`` (see ``field_error``).

``request_models`` derives the models one server publishes and enforces from its limits,
model name and context length, so that the OpenAPI schema matches what it accepts.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)
from engine.serving.response_models import (  # noqa: F401  (re-exported: the server's imports)
    UsageInfo, CompletionLogprobs, CompletionChoice, CompletionResponse, TopLogprob, TokenLogprob, ChatLogprobs,
    AssistantMessage, ChatChoice, ChatCompletionResponse, DeltaMessage, ChatStreamChoice, ChatCompletionChunk,
    CompletionChunk, ModelCard, ModelList, ErrorDetail, ErrorResponse)

MAX_TOKENS = 2**31 - 1  # the engine's bound on max_tokens / min_tokens / token ids


def encodable(text: str | None) -> str | None:
    """``text`` as UTF-8 can carry it: a lone surrogate the client sent (JSON's ``"\\ud800"``, in a
    model name or a field's name) is written as its escape, else the error quoting it fails (500)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error that is not tied to one field's location but blames ``param``."""
    return PydanticCustomError("invalid_value", "{message}", {"message": message, "param": param})


def _unsupported(name: str, accepted: str | None = None) -> PydanticCustomError:
    hint = f" (leave it unset or {accepted})" if accepted else " (leave it unset)"
    return field_error(name, f"{name} is not supported by this server{hint}")


# -- known fields the engine cannot honour -------------------------------------------------------
def _null_only(value: Any, info: ValidationInfo) -> Any:
    if value is not None:
        raise _unsupported(info.field_name)
    return None


def _empty_only(value: Any, info: ValidationInfo) -> Any:
    if value:
        raise _unsupported(info.field_name, "empty")
    return value


def _true_only(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value is not True:
        raise _unsupported(info.field_name, "true")
    return value


def _text_format_only(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value != {"type": "text"}:
        raise _unsupported(info.field_name, '{"type": "text"}')
    return value


def _text_modality_only(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value != ["text"]:
        raise _unsupported(info.field_name, '["text"]')
    return value


def _doc(schema: dict, what: str) -> dict:
    return {**schema, "description": f"Not supported: a request that sets it to anything else is rejected "
                                     f"with 400. {what}".strip()}


_NULL = {"type": "null"}
Unsupported = Annotated[Any, BeforeValidator(_null_only), WithJsonSchema(_doc(_NULL, ""))]
EmptyMapOnly = Annotated[dict[str, float] | None, AfterValidator(_empty_only),
                         WithJsonSchema(_doc({"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]},
                                             "Accepted: {}."))]
EmptyTextOnly = Annotated[str | None, AfterValidator(_empty_only),
                          WithJsonSchema(_doc({"anyOf": [{"type": "string", "maxLength": 0}, _NULL]},
                                              'Accepted: "".'))]
TrueOnly = Annotated[Any, BeforeValidator(_true_only),
                     WithJsonSchema(_doc({"anyOf": [{"type": "boolean", "enum": [True]}, _NULL]}, "Accepted: true."))]
TextFormatOnly = Annotated[Any, BeforeValidator(_text_format_only), WithJsonSchema(_doc({"anyOf": [
    {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}}, "required": ["type"],
     "additionalProperties": False}, _NULL]}, 'Accepted: {"type": "text"}.'))]
TextModalityOnly = Annotated[Any, BeforeValidator(_text_modality_only), WithJsonSchema(_doc({"anyOf": [
    {"type": "array", "items": {"type": "string", "enum": ["text"]}, "minItems": 1, "maxItems": 1}, _NULL]},
    'Accepted: ["text"].'))]

# cross-field rules the schema states too (``if``/``then``), so that generated requests respect them
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    _integer_fields: ClassVar[frozenset[str]] = frozenset()  # fields of integers (or lists of them)
    _foreign_fields: ClassVar[frozenset[str]] = frozenset()  # other APIs' fields: ignored, never a near miss
    _top_level: ClassVar[bool] = False  # a near miss blames itself (top level) or the field holding it

    @field_validator("*", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any, info: ValidationInfo) -> Any:
        return _integral(value) if info.field_name in cls._integer_fields else value

    @model_validator(mode="wrap")
    @classmethod
    def _near_misses(cls, data: Any, handler):
        """A near miss of a field (``max_token``, or ``contnet`` inside a message) is a 400 naming
        both, at any depth: ignoring it would silently drop what the client meant to set."""
        if isinstance(data, dict):
            known = cls.model_fields
            misses = [(k, m) for k in data if isinstance(k, str) and k not in known
                      and (m := misspelt_field(k, known, cls._foreign_fields))]
            if misses:  # the client's names, escaped: pydantic cannot render a lone surrogate
                misses = [(encodable(k), m) for k, m in misses]
                listed = ", ".join(f"{k} (did you mean {m}?)" for k, m in misses)
                message = f"Unrecognized request argument{'s' if len(misses) > 1 else ''} supplied: {listed}"
                if cls._top_level:
                    raise field_error(misses[0][0], message)
                raise PydanticCustomError("invalid_value", "{message}", {"message": message})
        return handler(data)


class StreamOptions(_Strict):
    _foreign_fields = frozenset({"continuous_usage_stats", "include_obfuscation"})  # vLLM's, OpenAI's

    include_usage: bool | None = False


def _integral(value: Any) -> Any:
    """``10.0`` is the integer 10 (JSON Schema's ``integer``), in lists too; anything else is left
    for the strict check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKENS)]

# fields of OpenAI's and vLLM's (and other servers') request bodies that this server does not
# model: accepted and ignored, never taken for a misspelling of a field it models (``store`` is
# close to ``stop``, ``prompt_logprobs`` to ``logprobs``)
FOREIGN_FIELDS = frozenset({
    # OpenAI
    "metadata", "store", "service_tier", "reasoning_effort", "reasoning", "verbosity", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier", "background", "include", "instructions", "text",
    "truncation", "messages", "prompt",
    # vLLM
    "use_beam_search", "length_penalty", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
    "prompt_logprobs", "add_special_tokens", "return_tokens_as_token_ids", "return_token_ids", "priority",
    "request_id", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structural_tag", "structured_outputs", "logits_processors", "cache_salt",
    "kv_transfer_params", "vllm_xargs", "echo", "add_generation_prompt", "continue_final_message",
    "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs", "media_io_kwargs",
    "best_of",
    # TGI, SGLang, Aphrodite, llama.cpp
    "top_a", "typical_p", "tfs", "mirostat", "mirostat_tau", "mirostat_eta", "do_sample", "watermark",
    "details", "decoder_input_details", "return_full_text", "top_n_tokens", "regex", "json_schema", "ebnf",
    "lora_path", "return_hidden_states", "cache_prompt", "n_probs", "n_predict",
})
MISSPELLING_CUTOFF = 0.8  # difflib's ratio at which an unknown field is taken for a known one


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def misspelt_field(name: str, known, foreign=FOREIGN_FIELDS) -> str | None:
    """The field of ``known`` that the unknown field ``name`` is a near miss of (``max_token``,
    ``Temperature``, ``maxTokens``, ``top-p``), or None: a field of another API (``foreign``), or
    none close enough (``MISSPELLING_CUTOFF``)."""
    if name in foreign:
        return None
    known = sorted(known)
    same = [k for k in known if _squash(k) == _squash(name)]
    if same:
        return same[0]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=MISSPELLING_CUTOFF)
    return close[0] if close else None


def unknown_fields(model: BaseModel) -> tuple[str, ...]:
    """The request's top-level fields that this server ignored (none is a near miss of a field)."""
    return getattr(model, "_ignored_fields", ())


class _SamplingRequest(_Strict):
    _integer_fields = frozenset({"n", "seed", "top_k", "min_tokens", "max_tokens", "stop_token_ids"})
    _foreign_fields = FOREIGN_FIELDS
    _top_level = True
    _ignored_fields: tuple[str, ...] = PrivateAttr(default=())

    model: str | None = Field(None, description="The served model's name (null: the served model).")
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="-1 or 0: no limit (vLLM extension).")
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS,
                                   description="At most max_tokens (vLLM extension).")
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from the logit of each token the output holds already.")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Times its count, subtracted from the logit of each token the output holds.")
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
        description="Tokens of the prompt or the output: a logit > 0 divided by it, else multiplied (vLLM "
                    "extension; 1: none).")
    min_p: float | None = Field(None, ge=0, le=1, description="After temperature, tokens less likely than min_p "
                                                              "times the likeliest are dropped (vLLM extension).")
    include_stop_str_in_output: bool | None = Field(
        False, description="The stop string (or stop token's text) that ends a choice stays in it (vLLM extension).")
    skip_special_tokens: bool | None = Field(
        True, description="Leave the text of special tokens (BOS, EOS, a chat template's markers) out of the "
                          "output (vLLM extension; false keeps it).")
    # known, not supported (rejected unless neutral)
    logit_bias: EmptyMapOnly = None
    spaces_between_special_tokens: TrueOnly = None  # HF's fast tokenizers put no spaces between them

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields(cls, data: Any, handler):
        """Unknown top-level fields that are no near miss (``_near_misses``) are kept in
        ``_ignored_fields``: the response names them."""
        model = handler(data)
        if isinstance(data, dict):
            model._ignored_fields = tuple(k for k in data if isinstance(k, str) and k not in cls.model_fields)
        return model

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "stream_options is only allowed when stream is true")
        return self

    def _params(self, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError("invalid SamplingParams: <field> ...") for values the engine refuses."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_tokens=self.min_tokens or 0,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            output_kind="delta" if self.stream else "final_only",
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=self.skip_special_tokens is not False,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def sampling_field_names(self) -> dict[str, str]:
        """SamplingParams field -> the request field that sets it (where the names differ)."""
        return {}


class CompletionRequest(_SamplingRequest):
    _integer_fields = _SamplingRequest._integer_fields | {"prompt", "logprobs", "best_of"}
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, {
        "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
        "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}}]})

    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="Text, token ids, or a list of either (one choice per prompt and sample).")
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS,
                                   description="0 only with echo (score the prompt); null: up to the context.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: EmptyTextOnly = None
    best_of: Annotated[int | None, WithJsonSchema(
        _doc(_NULL, "Equal to n is accepted and means n."))] = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise _unsupported("best_of", "equal to n")
        if self.max_tokens == 0 and not self.echo:
            raise field_error("max_tokens", "max_tokens must be >= 1 (0 is only allowed with echo, to score "
                                            "the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        prompt_logprobs = None
        if self.echo:  # the prompt's logprobs come with the echoed prompt; max_tokens=0 scores it
            prompt_logprobs = self.logprobs if self.logprobs is not None else (0 if self.max_tokens == 0 else None)
        return self._params(self.max_tokens, self.logprobs, prompt_logprobs)

    @property
    def sampling_field_names(self) -> dict[str, str]:
        return {"prompt_logprobs": "logprobs"}


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # OpenAI's and vLLM's message fields this server does not read
    _foreign_fields = frozenset({"tool_calls", "tool_call_id", "function_call", "refusal", "audio", "annotations",
                                 "reasoning", "reasoning_content", "prefix", "weight"})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    _integer_fields = _SamplingRequest._integer_fields | {"max_completion_tokens", "top_logprobs"}
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, {
        "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Deprecated: max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Only with logprobs: true.")
    # known, not supported (rejected unless neutral)
    tools: Unsupported = None
    tool_choice: Unsupported = None
    parallel_tool_calls: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    response_format: TextFormatOnly = None
    modalities: TextModalityOnly = None
    audio: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens  # None: up to the context length
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    @property
    def sampling_field_names(self) -> dict[str, str]:
        return {"logprobs": "top_logprobs",
                "max_tokens": "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"}


class RequestLimits(Protocol):
    max_prompts_per_request: int
    max_n: int
    max_stop_strings: int
    max_stop_string_chars: int


def request_models(limits: RequestLimits, served_model_name: str, max_model_len: int,
                   vocab_size: int | None = None) -> tuple[type[CompletionRequest], type[ChatCompletionRequest]]:
    """The request models of one server: its limits (prompts per request, ``n``, stop strings), its
    model's name, context length and vocabulary, in the validation and in the published schema."""
    top_id = MAX_TOKENS if vocab_size is None else vocab_size - 1
    Id = Annotated[int, Field(ge=0, le=top_id)]
    # the engine checks prompt ids against the vocabulary (a 400 naming the prompt); the schema says it
    PromptIds = Annotated[list[Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": top_id})]],
                          Field(min_length=1)]
    StopString = Annotated[str, Field(min_length=1, max_length=limits.max_stop_string_chars)]
    common = dict(
        model=(str | None, Field(None, json_schema_extra={"enum": [served_model_name, None]},
                                 description="The served model's name (null: the served model).")),
        n=(int | None, Field(None, ge=1, le=limits.max_n)),
        stop=(StopString | Annotated[list[StopString], Field(max_length=limits.max_stop_strings)] | None, None),
        stop_token_ids=(list[Id] | None, None),
    )
    # a prompt has at least one token, so no request can generate max_model_len tokens or more
    out_len = max(max_model_len - 1, 1)
    completion = create_model(
        "CompletionRequest", __base__=CompletionRequest, **common,
        prompt=(str | Annotated[list[str], Field(min_length=1, max_length=limits.max_prompts_per_request)]
                | PromptIds
                | Annotated[list[PromptIds], Field(min_length=1, max_length=limits.max_prompts_per_request)],
                Field(description="Text, token ids, or a list of either (one choice per prompt and sample).")),
        max_tokens=(int | None, Field(16, ge=0, le=out_len,
                                      description="0 only with echo (score the prompt); null: up to the context.")),
    )
    chat = create_model(
        "ChatCompletionRequest", __base__=ChatCompletionRequest, **common,
        max_tokens=(int | None, Field(None, ge=1, le=out_len, description="Deprecated: max_completion_tokens.")),
        max_completion_tokens=(int | None, Field(None, ge=1, le=out_len)),
    )
    return completion, chat

