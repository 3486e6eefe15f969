import itertools
import logging
import os
from dataclasses import dataclass, field

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be on before any
# module decorates a kernel, so it is set here, ahead of every test import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Hydra's job logging (``kvlab serve``'s ``@hydra.main`` run in-process) puts a root handler on
    the stream this test captured; left there, a later test's log line meets a closed stream and
    prints a logging error into that test's stderr. Handlers a test adds are taken off after it
    (pytest's own capture handlers come and go by themselves)."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in before and not type(h).__module__.startswith("_pytest"):
            root.removeHandler(h)
    root.setLevel(level)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_hf_checkpoint(path, kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random HF model saved with save_pretrained (safetensors)."""
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{"sliding_window": None, **common})
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # HF initialises norms to 1; perturb them so a wrong norm placement would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def make_bpe_tokenizer(corpus: str, bos_post: bool = False):
    """A byte-level BPE tokenizer trained offline on ``corpus`` (300 ids, <unk> <s> </s> first),
    as an HF fast tokenizer to save beside a checkpoint; ``bos_post``: encode adds <s> (id 1), as
    Llama's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 50, trainer)
    if bos_post:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_hf")
    return str(path), make_hf_checkpoint(path, "llama")


@pytest.fixture(scope="session")
def hf_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3_hf")
    return str(path), make_hf_checkpoint(path, "qwen3", seed=1)


_fake_ids = itertools.count(1000)


@dataclass(eq=False)
class FakeSeq:
    """The fields an allocator reads from a sequence (allocators.base.SequenceLike)."""

    token_ids: list[int]
    max_len: int
    seq_id: int = field(default_factory=lambda: next(_fake_ids))
    prompt_len: int = 0
    oracle_len: int = 0

    def __post_init__(self):
        self.prompt_len = self.prompt_len or len(self.token_ids)
        self.oracle_len = self.oracle_len or self.max_len


def come_back(alloc, live: list, seq: FakeSeq, extra: list[int], max_len: int):
    """A conversation's turn ends (``seq`` freed, out of ``live``) and it comes back with its
    tokens and ``extra``: (the new sequence, its tokens, the prefix tokens the allocator matched)."""
    alloc.free(seq)
    live.remove(seq)
    tokens = (seq.token_ids + extra)[:max_len - 1]
    new = FakeSeq(tokens, max_len)
    return new, tokens, alloc.match_prefix(new)


def serve_in_thread(app):
    """Serve the ASGI ``app`` with uvicorn on a free local port in a daemon thread: yields its base
    URL, then stops it (a generator for a fixture to ``yield from``)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(5)


def serve_engine_in_thread(limits, model: str = "tiny", max_model_len: int = 64):
    """``kvlab serve``'s server (``build_server``) over a tiny CPU engine with ``limits``, on a free
    local port in a daemon thread: yields (base URL, port, its AsyncEngine), then stops both (a
    generator for a fixture to ``yield from``)."""
    import socket
    import threading
    import time

    from engine import EngineConfig, LLMEngine
    from engine.serving.server import build_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=max_model_len,
                                    kv_cache_tokens=1024, record_memory=False))
    server, async_engine = build_server(engine, model, "127.0.0.1", port, log_level="warning", access_log=False,
                                        limits=limits)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port, async_engine, server
    finally:
        server.should_exit = True
        thread.join(15)
        async_engine.shutdown()


class KernelSpy:
    """Stands in for a ``@triton.jit`` kernel (monkeypatched over it): records each launch's PDL-related
    arguments (``PDL``, ``PREFETCH_LINES``, ``launch_pdl``) and its tile (``BLOCK_N``, ``num_warps``,
    ``num_stages``), then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({k: kwargs.get(k) for k in ("PDL", "PREFETCH_LINES", "launch_pdl", "BLOCK_N",
                                                            "num_warps", "num_stages")})
            return self.kernel[grid](*args, **kwargs)
        return launch
