"""The oracle's sub-commands: `refinfer logits`, `compare`, `perplexity` and `trace`.

Where this sits: cli.build_parser adds these parsers; each command is a thin layer
over refinfer.oracle (files, compare, perplexity, trace): read arguments, call,
print. Figures for people go to stderr, JSON for programs to stdout. Exit status:
0 pass, 1 a tolerance of `compare` failed, 2 bad input (a RefinferError).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from refinfer.cli import add_numerics_argument
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.oracle.compare import TOLERANCE_MODEL

EXIT_TOLERANCE_FAILED = 1


def _input_ids(args: argparse.Namespace, model) -> list[int]:
    """The token ids of --prompt TEXT, --ids 1,2,3 or -f FILE."""
    if args.ids is not None:
        try:
            return [int(i) for i in args.ids.split(",")]
        except ValueError as e:
            raise InvalidParameterError(f"--ids takes comma-separated integers ({e})") from e
    text = args.prompt if args.prompt is not None else _read_text(args.file)
    return model.tokenizer.encode(text)


def _read_text(path: str) -> str:
    """A UTF-8 text file, or RefinferError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RefinferError(f"{path}: cannot read the text ({e})") from e


def _progress(total: int, quiet: bool, unit: str):
    """A tqdm bar on stderr (the cli's convention)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=quiet)


@contextmanager
def _workers(args: argparse.Namespace, model):
    """With --ray SPEC, a distributed.WorkerPool of the model (its file and numerics) for the
    duration; else None."""
    if not args.ray:
        yield None
        return
    from refinfer.oracle import distributed

    with (
        distributed.cluster(args.ray),
        distributed.WorkerPool(model.path, args.threads or 1, model.numerics) as w,
    ):
        yield w


def _check_reference_numerics(args: argparse.Namespace) -> None:
    """--reference is reference.py's float64 math, the oracle of the exact numerics only."""
    if args.reference and args.numerics != "exact":
        raise InvalidParameterError(
            f"--reference computes reference.py's float64 math, which has no {args.numerics} "
            f"numerics; drop --reference, or --numerics {args.numerics}"
        )


def cmd_logits(args: argparse.Namespace) -> int:
    """Write the logits of every position of a text or ids to a .npz (files.py)."""
    from refinfer.cli import _load_model, _set_threads
    from refinfer.oracle.files import logits_file

    if args.ray and not args.ctx_size:
        raise InvalidParameterError("--ray shards a corpus cut into sequences: add -c N_CTX")
    _check_reference_numerics(args)
    _set_threads(args.threads)
    model = _load_model(args)
    ids = _input_ids(args, model)
    with _workers(args, model) as workers:
        f = logits_file(model, ids, args.reference, args.ctx_size, workers)
    f.save(args.output)
    print(
        f"wrote {args.output}: {len(f.ids)} positions x {f.arrays['logits'].shape[1]} logits "
        f"({f.arrays['logits'].dtype}, {f.provenance['computed_by']}, numerics "
        f"{f.provenance['numerics']})",
        file=sys.stderr,
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Write the named intermediates of one prefill to a .npz (trace.py)."""
    from refinfer.cli import _load_model, _set_threads
    from refinfer.oracle.trace import trace_file

    _check_reference_numerics(args)
    _set_threads(args.threads)
    model = _load_model(args)
    names = args.names.split(",") if args.names else None
    f = trace_file(model, _input_ids(args, model), names, reference=args.reference)
    f.save(args.output)
    print(
        f"wrote {args.output}: {len(f.arrays)} tensors of {len(f.ids)} positions "
        f"({f.provenance['computed_by']}, numerics {f.provenance['numerics']})",
        file=sys.stderr,
    )
    return 0


def _tolerance(args: argparse.Namespace):
    from refinfer.oracle.compare import Tolerance

    return Tolerance(
        max_abs=args.max_abs,
        max_nmse=args.max_nmse,
        max_kld=args.max_kld,
        min_top1=args.min_top1,
        top_k=args.top_k,
    )


def _report(report: dict, text: str, problems: list[str], as_json: bool) -> int:
    """Print a comparison (JSON on stdout or text on stderr) and its verdict."""
    if as_json:
        print(json.dumps(report | {"pass": not problems, "failures": problems}))
    else:
        print(text, file=sys.stderr)
    for line in problems:
        print(f"refinfer: compare: FAIL: {line}", file=sys.stderr)
    return EXIT_TOLERANCE_FAILED if problems else 0


def _check_numerics(args: argparse.Namespace, a: dict, b: dict) -> None:
    """Refuse files of different numerics (each side's provenance) without
    --allow-mixed-numerics; a side that does not record it (a KLD file) is not checked."""
    from refinfer.oracle.compare import numerics_of

    na, nb = numerics_of(a), numerics_of(b)
    if na and nb and na != nb and not args.allow_mixed_numerics:
        raise InvalidParameterError(
            f"{args.a} was computed with numerics {na} and {args.b} with {nb}, so the figures "
            "would measure the arithmetic as well as the engine; compare files of one "
            "numerics, or pass --allow-mixed-numerics"
        )


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two logits files (or llama.cpp KLD base files), or two trace files."""
    from refinfer.oracle import compare, files, kld_file

    tol = _tolerance(args)
    paths = (args.a, args.b)
    traces = [
        Path(p).is_file() and not kld_file.is_kld_file(p) and files.read(p).kind == "trace"
        for p in paths
    ]
    if any(traces):
        if not all(traces):
            raise InvalidParameterError("compare a trace file with another trace file")
        fa, fb = files.read(args.a), files.read(args.b)
        _check_numerics(args, fa.provenance, fb.provenance)
        r = compare.compare_traces(fa, fb, tol)
        bad = compare.trace_failure(r)
        return _report(r, compare.format_trace_report(r), [bad] if bad else [], args.json)
    a, b = compare.open_rows(args.a), compare.open_rows(args.b)
    _check_numerics(args, a.provenance, b.provenance)
    r = compare.compare_rows(a, b, top_k=args.top_k or 5)
    return _report(r, compare.format_rows_report(r), compare.failures(r, tol, a.ids), args.json)


def _print_numerics(model, base: str | None) -> None:
    """The numerics of the model measured, on stderr: a KLD base file, byte for byte
    llama.cpp's format, has no place to record it."""
    note = f"; {base}, in llama.cpp's format, records no numerics" if base else ""
    print(f"numerics {model.numerics} ({model.path.name}){note}", file=sys.stderr)


def cmd_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of a text as llama-perplexity computes it; write or read a KLD base file."""
    from refinfer.cli import _load_model, _set_threads
    from refinfer.oracle import kld_file, perplexity
    from refinfer.oracle.kld_report import MIN_POSITIONS, format_summary

    if args.kl_divergence and not args.kl_divergence_base:
        raise InvalidParameterError("--kl-divergence reads the file of --kl-divergence-base FILE")
    if not args.kl_divergence and args.file is None:
        raise InvalidParameterError("perplexity needs the text: -f FILE")
    _set_threads(args.threads)
    if args.kl_divergence:
        n_chunk = kld_file.read(args.kl_divergence_base).n_chunk  # bad files fail before loading
        model = _load_model(args)
        with _workers(args, model) as workers, _progress(n_chunk, args.quiet, "chunk") as bar:
            report = perplexity.kl_divergence(
                model, args.kl_divergence_base, args.batch_size, bar.update, workers
            )
        s = report.summary() | {"numerics": model.numerics}
        if args.json:
            print(json.dumps(s))
        elif s["positions"] < MIN_POSITIONS:
            print(
                f"{s['positions']} positions: too few for statistics (llama.cpp prints them "
                f"from {MIN_POSITIONS})",
                file=sys.stderr,
            )
        else:
            print(format_summary(s))
        _print_numerics(model, args.kl_divergence_base)
        return 0
    model = _load_model(args)
    ids = model.tokenizer.encode(_read_text(args.file))
    n_chunk = perplexity.chunk_tokens(ids, args.ctx_size, args.chunks).shape[0]
    with _workers(args, model) as workers, _progress(n_chunk, args.quiet, "chunk") as bar:
        r = perplexity.perplexity(
            model,
            ids,
            args.ctx_size,
            args.chunks,
            args.batch_size,
            args.kl_divergence_base,
            bar.update,
            workers,
        ) | {"numerics": model.numerics}
    if args.json:
        print(json.dumps(r))
    else:
        print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(r["chunk_ppl"])))
        print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_uncertainty']:.5f}")
    if args.kl_divergence_base:
        print(
            f"wrote {args.kl_divergence_base}: llama.cpp KLD base, {r['chunks']} chunks of "
            f"{args.ctx_size}",
            file=sys.stderr,
        )
    _print_numerics(model, args.kl_divergence_base)
    return 0


def _add_input(p: argparse.ArgumentParser) -> None:
    """MODEL and one of --prompt / --ids / -f, -o OUT, --reference, --threads."""
    p.add_argument("model", nargs="?", metavar="MODEL.gguf", help="default: SmolLM2")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="a text, tokenised with the model's vocabulary")
    src.add_argument("--ids", help="token ids, comma-separated: 1,2,3")
    src.add_argument("-f", "--file", help="a UTF-8 text file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument(
        "--reference",
        action="store_true",
        help="float64 values of reference.py (slow), not model.forward's float32",
    )
    p.add_argument("--threads", type=int, default=0, help="kernel threads (default: all)")
    add_numerics_argument(p)


def _add_ray(p: argparse.ArgumentParser) -> None:
    """--ray SPEC: shard the chunks over a Ray cluster (refinfer/oracle/distributed.py)."""
    p.add_argument(
        "--ray",
        metavar="local:N|auto|ADDRESS",
        help="run the chunks on Ray workers, one model each (--threads each, default 1): "
        "local:N starts N on this machine, auto or ADDRESS joins a cluster whose nodes read "
        "MODEL at the same path; results are bitwise those of one process. Needs "
        "pip install 'refinfer[ray]'",
    )


def add_parsers(sub) -> None:
    """The oracle's sub-commands, on the cli's sub-parsers."""
    lg = sub.add_parser(
        "logits",
        help="write the logits of every position to a .npz (lossless, for CI)",
        description="Write OUT.npz: the token ids, the logits of every position (float32 from "
        "the fast path; float64 from reference.py with --reference) and provenance (model "
        "file and its sha256, refinfer version, numerics, threads, KV block size). Read it "
        "with NumPy alone: np.load(OUT.npz)['logits']; see refinfer/oracle/files.py.",
    )
    _add_input(lg)
    lg.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        metavar="N",
        help="a corpus: fresh sequences of N tokens one after another (the rest dropped)",
    )
    _add_ray(lg)
    lg.set_defaults(run=cmd_logits)

    tr = sub.add_parser(
        "trace",
        help="write per-layer intermediates (llama.cpp's names) to a .npz",
        description="Write OUT.npz with the named intermediates of one prefill: attn_norm-N, "
        "Qcur-N, Kcur-N, Vcur-N, kqv_out-N, attn_out-N, ffn_inp-N, ffn_out-N, l_out-N, "
        "result_norm, result_output (llama.cpp's names). `refinfer compare` on two trace "
        "files names the first tensor, layer and position that differ.",
    )
    _add_input(tr)
    tr.add_argument(
        "--names", help="comma-separated: Qcur (every layer), l_out-3, ... (default: all)"
    )
    tr.set_defaults(run=cmd_trace)

    cmp = sub.add_parser(
        "compare",
        help="compare two logits or trace files: statistics and tolerances",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare B against A (the base): per position and overall max |Δlogit|, "
        "NMSE (ggml's), KL divergence with llama.cpp's percentiles, top-1 agreement, vLLM's "
        "top-k rule and the first position whose argmax differs. A and B are logits files "
        "(`refinfer logits`) or llama.cpp KLD base files (compared as log-probabilities), "
        "or two trace files (`refinfer trace`). The report gives the numerics each side "
        "was computed with (exact or ggml, from refinfer's files; a KLD file records none); "
        "two files of different numerics are refused unless --allow-mixed-numerics. Exit "
        "status 1 when a given tolerance fails (the message names the worst position and "
        "token), 2 on bad input.",
        epilog=TOLERANCE_MODEL,
    )
    cmp.add_argument("a", metavar="A", help="the base: .npz or llama.cpp KLD file")
    cmp.add_argument("b", metavar="B", help="the one tested")
    cmp.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    cmp.add_argument("--max-abs", type=float, metavar="X", help="fail if max |Δlogit| > X")
    cmp.add_argument(
        "--max-nmse",
        type=float,
        metavar="X",
        help="fail if NMSE > X (traces: per tensor, default 1e-7)",
    )
    cmp.add_argument("--max-kld", type=float, metavar="X", help="fail if the mean KLD > X")
    cmp.add_argument(
        "--min-top1",
        type=float,
        metavar="X",
        help="fail if the fraction of positions with the same argmax < X",
    )
    cmp.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="fail if vLLM's top-K rule fails anywhere (reported with K = 5 when not given)",
    )
    cmp.add_argument(
        "--allow-mixed-numerics",
        action="store_true",
        help="compare files computed with different numerics (exact against ggml: the "
        "figures then include the arithmetic's difference); without it that is refused "
        "with exit 2. The report gives each side's numerics either way",
    )
    cmp.set_defaults(run=cmd_compare)

    ppl = sub.add_parser(
        "perplexity",
        help="perplexity as llama-perplexity, and its KL-divergence files",
        description="Perplexity of a text with llama-perplexity's semantics: tokenised "
        "once, cut into chunks of -c tokens, each chunk's first token replaced by BOS where "
        "the vocabulary adds one, only the second half of each chunk scored. With "
        "--kl-divergence-base FILE it also writes FILE in llama.cpp's format; with "
        "--kl-divergence as well it reads FILE (refinfer's or llama.cpp's) and prints "
        "llama.cpp's KL-divergence statistics of this model against it.",
        epilog="Example: refinfer perplexity models/a.gguf -f wiki.txt -c 512 "
        "--kl-divergence-base a.kld && refinfer perplexity models/b.gguf "
        "--kl-divergence-base a.kld --kl-divergence",
    )
    ppl.add_argument("model", nargs="?", metavar="MODEL.gguf", help="default: SmolLM2")
    ppl.add_argument("-f", "--file", help="the text (UTF-8)")
    ppl.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk length (512)")
    ppl.add_argument("--chunks", type=int, help="at most this many chunks (default: all)")
    ppl.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=512,
        help="tokens per forward call (512); results do not depend on it",
    )
    ppl.add_argument("--kl-divergence-base", metavar="FILE", help="write (or read) FILE")
    ppl.add_argument("--kl-divergence", action="store_true", help="read FILE, print the KLD")
    ppl.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    ppl.add_argument("--threads", type=int, default=0, help="kernel threads (default: all)")
    add_numerics_argument(ppl)
    _add_ray(ppl)
    ppl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ppl.set_defaults(run=cmd_perplexity)
