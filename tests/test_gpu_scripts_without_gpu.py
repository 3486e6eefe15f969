"""The README's GPU-only scripts, run verbatim on a machine without CUDA: one line saying so (a
SystemExit), before they build a model or start a server, never a traceback of a later failure."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_profile_step_says_it_needs_a_gpu(no_cuda):
    from experiments import profile_step

    with pytest.raises(SystemExit, match="profile_step needs a CUDA device"):
        profile_step.main(["--model", "tiny-llama", "--batch", "2", "--prompt-len", "8", "--steps", "1"])


def test_serve_vs_offline_says_it_needs_a_gpu(no_cuda, tmp_path):
    from experiments import serve_vs_offline

    with pytest.raises(SystemExit, match="serve_vs_offline needs a CUDA device"):
        serve_vs_offline.main(["--model", "tiny-llama", "--num-prompts", "2", "--out", str(tmp_path)])


def test_step_timing_names_the_missing_device_in_one_line(no_cuda, tmp_path):
    from experiments import step_timing

    with pytest.raises(SystemExit, match="step_timing: device='cuda' but no CUDA device is visible"):
        step_timing.main(["device=cuda", "workload.num_requests=2", "--out", str(tmp_path)])
