"""Scale-out on a local Ray instance of 2 workers: the chunks' rows, the PPL, the KLD base
file and the KLD statistics are bitwise those of one process, in chunk order; the CLI
imports Ray only with --ray."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refinfer
from refinfer.cli import main
from refinfer.oracle import commands, distributed, files, perplexity

pytest.importorskip("ray")  # the optional extra refinfer[ray], in dev

pytestmark = pytest.mark.usefixtures("one_thread")
N_CTX, CHUNKS, N_BATCH = 32, 7, 64  # tasks of 2, 2, 2 and 1 chunks over 2 workers
README = Path(__file__).parents[2] / "README.md"


@pytest.fixture(scope="module")
def ids(byte_model: Path) -> list[int]:
    text = README.read_text()[:1200]
    return refinfer.load(byte_model).tokenizer.encode(text)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for the module; the CLI's --ray joins it."""
    with distributed.cluster("local:2"):
        yield


@pytest.fixture
def workers(ray_cluster, byte_model: Path):
    """2 worker processes, each with the model; released after the test."""
    with distributed.WorkerPool(byte_model, threads=1) as pool:
        assert pool.n_workers == 2
        yield pool


def test_rows_are_bitwise_and_in_chunk_order(byte_model: Path, ids, workers) -> None:
    model = refinfer.load(byte_model)
    chunks = perplexity.chunk_tokens(ids, N_CTX, CHUNKS)
    here = list(perplexity.scored_logits(model, chunks, N_BATCH))
    there = list(workers.scored_logits(chunks, N_BATCH))
    assert len(there) == CHUNKS
    for a, b, chunk in zip(here, there, chunks, strict=True):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(
            perplexity.nll(b, perplexity.next_tokens(chunk)),
            perplexity.nll(a, perplexity.next_tokens(chunk)),
        )


def test_ppl_and_base_file_are_bitwise(byte_model: Path, ids, workers, tmp_path) -> None:
    model = refinfer.load(byte_model)
    one, many = tmp_path / "one.kld", tmp_path / "many.kld"
    r1 = perplexity.perplexity(model, ids, N_CTX, CHUNKS, N_BATCH, str(one))
    r2 = perplexity.perplexity(model, ids, N_CTX, CHUNKS, N_BATCH, str(many), workers=workers)
    assert r2 == r1  # ppl, its +-, mean NLL and every chunk's running PPL, as floats
    assert many.read_bytes() == one.read_bytes()
    k1 = perplexity.kl_divergence(model, str(one), N_BATCH).summary()
    k2 = perplexity.kl_divergence(model, str(one), N_BATCH, workers=workers).summary()
    assert k2 == k1


def test_logits_file_is_bitwise(byte_model: Path, ids, workers) -> None:
    model = refinfer.load(byte_model)
    one = files.logits_file(model, ids, n_ctx=N_CTX)
    many = files.logits_file(model, ids, n_ctx=N_CTX, workers=workers)
    np.testing.assert_array_equal(many.arrays["logits"], one.arrays["logits"])
    np.testing.assert_array_equal(many.ids, one.ids)
    assert len(one.ids) == len(ids) // N_CTX * N_CTX and one.provenance["n_ctx"] == N_CTX
    second = slice(N_CTX, 2 * N_CTX)  # a fresh sequence, not a continuation of the first
    np.testing.assert_array_equal(one.arrays["logits"][second], model.logits(ids[second]))


def test_cli_ray_option(byte_model: Path, ids, ray_cluster, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(refinfer.load(byte_model).tokenizer.decode(ids))
    args = ["perplexity", str(byte_model), "-f", str(text), "-c", str(N_CTX), "--chunks", "3"]
    runs = []
    for extra in ([], ["--ray", "local:2"]):
        assert main([*args, *extra, "--json", "-q"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[1] == runs[0]
    args = ["logits", str(byte_model), "-f", str(text), "-c", str(N_CTX)]
    assert main([*args, "-o", str(tmp_path / "one.npz")]) == 0
    assert main([*args, "-o", str(tmp_path / "many.npz"), "--ray", "auto"]) == 0
    one, many = (files.read(tmp_path / f) for f in ("one.npz", "many.npz"))
    np.testing.assert_array_equal(many.arrays["logits"], one.arrays["logits"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["logits", "--prompt", "Hi", "-o", "x.npz"], "add -c N_CTX"),
        (["perplexity", "-f", str(README), "-c", "32"], "takes a number of workers"),
    ],
)
def test_bad_ray_option_is_one_line(byte_model: Path, args, message, capsys) -> None:
    cmd, *rest = args
    assert main([cmd, str(byte_model), *rest, "--ray", "local:two"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_imports_ray_only_when_asked() -> None:
    code = "import sys, refinfer.cli, refinfer.oracle.commands; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_workers_load_the_model_in_the_drivers_numerics(ray_cluster, byte_model: Path) -> None:
    def numerics(model, chunks):  # pickled by value: the workers need not import this file
        return [model.numerics for _ in chunks]

    chunks = np.zeros((4, 2), np.int32)
    with distributed.WorkerPool(byte_model, threads=1, numerics="ggml") as pool:
        assert list(pool.map(numerics, chunks)) == ["ggml"] * 4
    with pytest.raises(refinfer.InvalidParameterError, match="numerics must be one of"):
        distributed.WorkerPool(byte_model, threads=1, numerics="bogus")


def test_cli_ray_pool_gets_the_models_numerics(byte_model: Path, monkeypatch) -> None:
    made = []

    class Pool:  # distributed.WorkerPool without Ray
        def __init__(self, path, threads, numerics):
            made.append((path, threads, numerics))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(distributed, "WorkerPool", Pool)
    monkeypatch.setattr(distributed, "cluster", lambda spec: contextlib.nullcontext())
    model = refinfer.load(byte_model, numerics="ggml")
    with commands._workers(argparse.Namespace(ray="local:2", threads=0), model) as pool:
        assert isinstance(pool, Pool)
    assert made == [(model.path, 1, "ggml")]
