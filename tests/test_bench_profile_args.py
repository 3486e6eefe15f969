"""``kvlab bench throughput``, ``kvlab bench serve``, ``kvlab profile`` and ``kvlab bench``'s dispatch:
a bad flag is one line naming it, exit code 2, before any device work (no GPU needed)."""
from __future__ import annotations

import json

import pytest

from conftest import serve_in_thread
from experiments import bench, bench_serve, profile_device
from experiments.cli import main as cli_main


def kvlab(capsys, *argv: str) -> tuple[int, str]:
    """The exit code and stderr of ``kvlab ARGV`` in this process (argparse's errors exit)."""
    try:
        code = cli_main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_device(monkeypatch):
    """Fails the test if the benchmark gets as far as its CUDA check or a measurement."""
    def refuse(*a, **k):
        raise AssertionError("reached the device")
    monkeypatch.setattr(bench.torch.cuda, "is_available", refuse)
    monkeypatch.setattr(bench, "copy_bandwidth", refuse)
    monkeypatch.setattr(profile_device, "Timer", refuse)
    monkeypatch.setattr(profile_device, "metadata", refuse)


# ------------------------------------------------------------------ kvlab bench throughput

@pytest.mark.parametrize("args, flag", [
    (["--input-len", "10"], "--input-len 10"),
    (["--input-len", "a:b"], "--input-len a:b"),
    (["--input-len", "20:10"], "--input-len 20:10"),
    (["--input-len", "0:10"], "--input-len 0:10"),
    (["--num-prompts", "0"], "--num-prompts 0"),
    (["--num-prompts", "-3"], "--num-prompts -3"),
    (["--output-len", "0"], "--output-len 0"),
    (["--models", "nope"], "--models nope"),
    (["--models", "tiny-llama,"], "--models"),
    (["--allocators", "foo"], "--allocators foo"),
    (["--max-model-len", "-1"], "--max-model-len -1"),
    (["--models", "tiny-llama", "--max-model-len", "5000"], "--max-model-len 5000"),
    (["--models", "tiny-llama", "--input-len", "10:600", "--max-model-len", "512"], "--input-len 10:600"),
    (["--gpu-memory-utilization", "2"], "--gpu-memory-utilization"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size 0"),
    (["--tensor-parallel-size", "1,x"], "--tensor-parallel-size 1,x"),
    (["--cuda-graph-max-tokens", "-5"], "--cuda-graph-max-tokens -5"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--num-prompts", "x"], "--num-prompts"),  # argparse's own error: one line too
])
def test_bench_throughput_refuses_a_bad_flag_before_the_device(args, flag, capsys, no_device, tmp_path):
    code, err = kvlab(capsys, "bench", "throughput", "--models", "tiny-llama", "--out", str(tmp_path / "o"), *args)
    line = one_line(err)
    assert code == 2 and line.startswith("kvlab bench throughput: ") and flag in line, line
    assert not (tmp_path / "o").exists()


def test_bench_throughput_names_the_allocators_and_a_close_match(capsys, no_device):
    code, err = kvlab(capsys, "bench", "throughput", "--allocators", "paged,pagd")
    line = one_line(err)
    assert code == 2 and "contiguous, paged, virtual" in line and "did you mean --allocators paged?" in line


def test_bench_throughput_refuses_an_unwritable_out(capsys, no_device, tmp_path):
    (tmp_path / "file").write_text("")
    code, err = kvlab(capsys, "bench", "throughput", "--models", "tiny-llama", "--out", str(tmp_path / "file" / "x"))
    assert code == 2 and "--out" in one_line(err)


def test_bench_throughput_good_flags_reach_the_cuda_check(capsys, monkeypatch, tmp_path):
    """Valid flags (a preset and a local HF directory) pass the checks: the CUDA check is next."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)))
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        cli_main(["bench", "throughput", "--models", f"tiny-llama,{tmp_path / 'hf'}", "--allocators", "paged,virtual",
                  "--input-len", "10:20", "--max-model-len", "0", "--tensor-parallel-size", "1,2",
                  "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------ kvlab bench (dispatch)

def test_bench_without_a_benchmark_names_both(capsys):
    code, err = kvlab(capsys, "bench")
    line = one_line(err)
    assert code == 2 and line.startswith("kvlab bench: ") and "throughput" in line and "serve" in line
    assert "required: what" not in line


def test_bench_unknown_benchmark_names_both_and_a_close_match(capsys):
    code, err = kvlab(capsys, "bench", "nope")
    line = one_line(err)
    assert code == 2 and line.startswith("kvlab bench: ") and "'nope'" in line and "serve" in line
    assert "kvlab bench throughput" not in line
    code, err = kvlab(capsys, "bench", "serv")
    assert code == 2 and "did you mean kvlab bench serve?" in one_line(err)


def test_bench_help_lists_the_benchmarks(capsys):
    assert cli_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "bench throughput" in out and "bench serve" in out


def test_profile_help_line_says_what_happens_without_a_gpu(capsys):
    assert cli_main(["--help"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("profile"))
    assert "CPU" in line


# ------------------------------------------------------------------ kvlab profile

@pytest.mark.parametrize("args, flag", [
    (["--reps", "0"], "--reps 0"),
    (["--block-sizes", "0"], "--block-sizes 0"),
    (["--block-sizes", "abc"], "--block-sizes abc"),
    (["--block-sizes", "16,2048"], "--block-sizes 16,2048"),
    (["--models", "nope"], "--models nope"),
    (["--models", "nope", "--skip", "host"], "--models nope"),
    (["--host-model", "nope"], "--host-model nope"),
    (["--merge", "/nonexistent.parquet"], "--merge /nonexistent.parquet"),
    (["--device", "gpu"], "--device gpu"),
    (["--max-model-len", "0"], "--max-model-len 0"),
    (["--pool-tokens", "-1"], "--pool-tokens -1"),
    (["--host-requests", "0"], "--host-requests 0"),
    (["--reps", "x"], "--reps"),  # argparse's own error: one line too
    (["--skip", "graph"], "--skip"),
    (["--host-add"], "--host-add"),
])
def test_profile_refuses_a_bad_flag_before_timing(args, flag, capsys, no_device, tmp_path):
    out = tmp_path / "p.parquet"
    code, err = kvlab(capsys, "profile", "--models", "tiny-llama", "--skip", "host,gemm,ragged,copy,vmm",
                      "--out", str(out), *args)
    line = one_line(err)
    assert code == 2 and line.startswith("kvlab profile: ") and flag in line, line
    assert not out.exists()


def test_profile_refuses_a_file_that_is_not_a_profile(capsys, no_device, tmp_path):
    (tmp_path / "junk.parquet").write_text("not parquet")
    code, err = kvlab(capsys, "profile", "--models", "tiny-llama", "--merge", str(tmp_path / "junk.parquet"),
                      "--out", str(tmp_path / "p.parquet"))
    assert code == 2 and "--merge" in one_line(err) and not (tmp_path / "p.parquet").exists()


def test_profile_refuses_cuda_without_a_device(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = kvlab(capsys, "profile", "--models", "tiny-llama", "--device", "cuda", "--out", str(tmp_path))
    assert code == 2 and "--device cuda" in one_line(err)


# ------------------------------------------------------------------ kvlab bench serve

@pytest.mark.parametrize("args, flag", [
    (["--temperature", "-1"], "--temperature"),
    (["--endpoint", "/foo"], "--endpoint"),
    (["--endpoint", "v1/completions"], "--endpoint"),
    (["--num-prompts", "x"], "--num-prompts"),
])
def test_bench_serve_refuses_a_bad_flag_locally(args, flag, capsys, monkeypatch):
    monkeypatch.setattr(bench_serve, "benchmark", lambda a: pytest.fail("sent requests"))
    code, err = kvlab(capsys, "bench", "serve", *args)
    line = one_line(err)
    assert code == 2 and line.startswith("kvlab bench serve: error: ") and flag in line


pytest.importorskip("httpx")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


VOCAB, MAX_LEN = 512, 256


def make_server():
    """kvlab's published request schema (token ids below VOCAB, MAX_LEN in the model card) over a
    handler that refuses ids outside the vocabulary with HTTP 400, as kvlab serve does."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from engine.serving.limits import ServerLimits
    from engine.serving.protocol import request_models

    completion, _ = request_models(ServerLimits(), "tiny", MAX_LEN, VOCAB)
    app = fastapi.FastAPI()
    seen: list[list[int]] = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": MAX_LEN}]}

    @app.post("/v1/completions", openapi_extra={"requestBody": {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}}})
    async def completions(request: fastapi.Request):
        body = await request.json()
        seen.append(body["prompt"])
        if max(body["prompt"]) >= VOCAB:
            return JSONResponse({"error": {"message": f"token id {max(body['prompt'])} out of vocabulary"}}, 400)

        async def stream():
            for k in range(body["max_tokens"]):
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{k}"}]}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    schema = app.openapi()  # the route's body is raw: put the request model into the published schema
    schema.setdefault("components", {}).setdefault("schemas", {})["CompletionRequest"] = \
        completion.model_json_schema(ref_template="#/components/schemas/{model}")
    return app, seen


@pytest.fixture(scope="module")
def server():
    app, seen = make_server()
    for url in serve_in_thread(app):
        yield url, seen


def serve_args(url: str, tmp_path, *extra: str) -> list[str]:
    return ["bench", "serve", "--base-url", url, "--disable-tqdm", "--num-prompts", "6", "--random-input-len", "40",
            "--random-output-len", "3", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
            *extra]


def test_bench_serve_learns_the_vocabulary(server, tmp_path, capsys):
    url, seen = server
    seen.clear()
    assert cli_main(serve_args(url, tmp_path)) == 0
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 6
    assert seen and all(10 <= t < VOCAB for p in seen for t in p)


def test_bench_serve_refuses_ids_or_lengths_beyond_the_server(server, tmp_path, capsys):
    url, seen = server
    seen.clear()
    code, err = kvlab(capsys, *serve_args(url, tmp_path, "--vocab-high", "1000"))
    assert code == 2 and "--vocab-high 1000" in one_line(err) and f"{VOCAB}" in err
    code, err = kvlab(capsys, *serve_args(url, tmp_path, "--random-input-len", "300"))
    assert code == 2 and "--random-input-len 300" in one_line(err) and f"{MAX_LEN}" in err
    assert not seen and not (tmp_path / "r.json").exists()  # no load sent, nothing saved


def test_bench_serve_all_failed_says_why_once_and_saves_nothing(server, tmp_path, capsys, monkeypatch):
    """Every request refused (a server that publishes no vocabulary, ids beyond it): n/a, not 0.00."""
    monkeypatch.setattr(bench_serve, "server_vocab", lambda args: None)
    code = cli_main(serve_args(server[0], tmp_path, "--random-input-len", "100"))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 1 and not (tmp_path / "r.json").exists()
    assert "Mean TTFT (ms):" in out and "0.00" not in out.split("Time to First Token")[1]
    assert "n/a" in out and out.count("out of vocabulary") == 1 and "nothing saved" in out
