"""The late-compile warning names what set a kernel variant apart from the warm-up's."""
import json
import logging

import pytest

pytest.importorskip("triton")
from kernels import compile_watch  # noqa: E402


def _spec(num_seqs_attr: str, block_q: int) -> dict:
    data = dict(name="k", signature={"q_ptr": "*bf16", "num_seqs": "i32"}, constant_keys=[["BLOCK_Q"]],
                constant_vals=[block_q], attrs_keys=[["num_seqs"]], attrs_vals=[[num_seqs_attr]],
                options={"num_warps": 4}, key="", target={})
    return {"compile": {"specialization_data": json.dumps(data)}, "repr": "k[num_warps=4](...)"}


def test_late_compile_is_named_with_its_difference(caplog):
    from triton import knobs

    if not compile_watch.install():
        pytest.skip("this Triton has no post-compile hook")
    hook = knobs.runtime.jit_post_compile_hook
    before = len(compile_watch.late_compiles())
    with compile_watch.expected():  # a warm-up's compile: recorded, not reported
        hook(**_spec("tt.divisibility=16", 16))
    assert len(compile_watch.late_compiles()) == before
    with caplog.at_level(logging.WARNING, logger="kernels.compile_watch"):
        hook(**_spec("", 16))
    late = compile_watch.late_compiles()[before:]
    assert len(late) == 1
    assert "attr.['num_seqs']: ['tt.divisibility=16'] -> ['']" in late[0][1]
    assert "BLOCK_Q" not in late[0][1]  # only what differs
    assert "after warm-up" in caplog.text
