"""refinfer against llama.cpp in one run: the tests of llama-bench, ratios, issue 15's targets.

Peer, the first one present: llama.cpp's own `llama-bench` (`make llama-bench` builds it
natively from the llama-cpp-python source distribution into build/); else llama.cpp through
llama-cpp-python (`make peers`; built for this CPU too, but driven token by token from
Python); else HF transformers (float32, from the same GGUF), and the targets against
llama.cpp are then not judged. `--peer` picks one. The tests, as llama-bench defines them:

    pp512        one forward call of 512 prompt tokens, from an empty context
    tg128        128 decode steps of one token each, from an empty context (positions 0-127)
    tg128@d512   128 decode steps after a 512-token context (its prefill not timed)

refinfer's decode steps feed back the argmax of each step's logits; llama-bench feeds random
tokens (the cost is the same). For refinfer also forward(8)/forward(1): one forward call of
8 tokens of one sequence (8 rows of logits, as speculative verification needs) over one of
1 token, after a 256-token context, the median of 9 interleaved pairs per repetition; and for
llama.cpp the same ratio from its pp8 and tg16 at depth 256 (8 x tg / pp8). Every figure is
the median [min-max] of --repeats repetitions; each engine runs in its own process after one
warm-up (refinfer's first forward call loads the compiled kernels from Numba's cache, or
compiles them: reported separately). With --busy N, N CPU-burning processes (`while True:
pass`; --busy-pin pins them to the first cores) run during a second tg128 of each
repetition, alternating with the quiet one and stopped after 15 s (a collapsed decode would
take minutes; refinfer with its thread governor on, as `refinfer generate` runs without
--threads), and for llama.cpp during a tg32 run of min(3, --repeats) repetitions;
"busy / quiet" is the ratio of their median tok/s to the quiet tg128's.

    python bench/bench_llama.py                     # SmolLM2 Q8_0, Q4_0, Q4_K_M, Gemma 3 270M
    python bench/bench_llama.py --busy 1 --out speed.md   # also decode with one core taken
    python bench/bench_llama.py --quick             # Q8_0, 3 repetitions (development)

Prints a markdown table (for the README's speed section) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import model_file, prompt_ids  # noqa: E402
from timing import log  # noqa: E402

LLAMA_BENCH = ROOT / "build/llama.cpp/cmake-build/bin/llama-bench"  # `make llama-bench`
PROMPT, GEN, DEPTH = 512, 128, 512
FWD_CONTEXT, FWD_T, FWD_PAIRS = 256, 8, 9
BUSY_SECONDS, BUSY_GEN = 15.0, 32  # refinfer's busy decode stops after 15 s; llama-bench's is tg32
TESTS = ("pp512", "tg128", "tg128@d512")
MODELS = "q8_0,q4_0,q4_k_m,gemma3"
NAMES = {"q8_0": "SmolLM2 Q8_0", "q4_0": "SmolLM2 Q4_0", "q4_1": "SmolLM2 Q4_1",
         "q4_k_m": "SmolLM2 Q4_K_M", "gemma3": "Gemma 3 270M Q4_K_M"}  # fmt: skip
BURN = "while True: pass"
PEERS = {
    "llama-bench": "llama.cpp (llama-bench)",
    "llama-cpp-python": "llama.cpp (llama-cpp-python)",
    "hf": "HF transformers",
}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def median_range(xs: list[float], digits: int) -> str:
    """'median [min-max]' of the samples."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(statistics.median(xs))} [{f.format(min(xs))}-{f.format(max(xs))}]"


# ---- burning cores -----------------------------------------------------------------------


@contextlib.contextmanager
def burning(n: int, pin: bool):
    """n processes that each keep a core busy while the block runs (pinned to the first n
    cores of this process's affinity if `pin`, else placed by the scheduler)."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(n):
        cpu = {cpus[i % len(cpus)]}
        pre = (lambda cpu=cpu: os.sched_setaffinity(0, cpu)) if pin else None
        procs.append(subprocess.Popen([sys.executable, "-c", BURN], preexec_fn=pre))
    try:
        time.sleep(0.2 if n else 0)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---- engines, each in a child process: reset() then eval(tokens) -> last logits ----------


class Refinfer:
    def __init__(self, model: str, numerics: str = "exact"):
        from refinfer.model import Batch, load

        self.Batch, self.m = Batch, load(model, numerics=numerics)
        self.vocab = self.m.config.vocab_size

    def reset(self) -> None:
        self.pool = self.m.new_pool(DEPTH + GEN + FWD_CONTEXT)
        self.seq = self.pool.new_sequence()

    def eval(self, tokens: list[int], all_logits: bool = False):
        batch = self.Batch.append(self.pool, [(self.seq, tokens)], all_logits=all_logits)
        return self.m.forward(batch, self.pool)[-1]


class LlamaCppPython:
    def __init__(self, model: str, threads: int):
        from llama_cpp import Llama

        # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores, indexed by position
        n = DEPTH + GEN + FWD_CONTEXT
        self.llm = Llama(model, n_ctx=n, n_batch=n, n_threads=threads, verbose=False)
        self.vocab = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()

    def eval(self, tokens: list[int]):
        self.llm.eval(tokens)
        return self.llm.scores[self.llm.n_tokens - 1]


class HF:
    def __init__(self, model: str):
        import torch
        from transformers import AutoModelForCausalLM

        path = Path(model)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        self.vocab = self.model.config.vocab_size

    def reset(self) -> None:
        self.past = None

    def eval(self, tokens: list[int]):
        with self.torch.inference_mode():
            x = self.torch.tensor([tokens])
            out = self.model(x, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()


def run_test(engine, test: str, ids: list[int], seconds: float = float("inf")) -> float:
    """tok/s of one run of `test` (pp512, tg128, tg128@d512) on a fresh context; decoding
    stops early once it has taken `seconds`."""
    import numpy as np

    engine.reset()
    if test == "pp512":
        start = time.perf_counter()
        engine.eval(ids[:PROMPT])
        return PROMPT / (time.perf_counter() - start)
    token = ids[0]
    if test == "tg128@d512":
        token = int(np.argmax(engine.eval(ids[:DEPTH])))
    start = time.perf_counter()
    n = 0
    while n < GEN and time.perf_counter() - start < seconds:
        token = int(np.argmax(engine.eval([token])))
        n += 1
    return n / (time.perf_counter() - start)


def forward_ratio(engine: Refinfer, ids: list[int]) -> float:
    """median forward(FWD_T tokens) / median forward(1 token) after FWD_CONTEXT tokens,
    over FWD_PAIRS interleaved pairs."""
    engine.reset()
    engine.eval(ids[:FWD_CONTEXT])
    times = {1: [], FWD_T: []}
    for _ in range(FWD_PAIRS):
        for t in (1, FWD_T):
            start = time.perf_counter()
            engine.eval(ids[FWD_CONTEXT : FWD_CONTEXT + t], all_logits=True)
            times[t].append(time.perf_counter() - start)
            engine.pool.truncate(engine.seq, FWD_CONTEXT)
    return statistics.median(times[FWD_T]) / statistics.median(times[1])


@contextlib.contextmanager
def governed(engine_name: str, threads: int):
    """refinfer's thread governor on inside the block (kernels/threads.py), up to `threads`."""
    if engine_name != "refinfer":
        yield
        return
    import numba

    from refinfer.kernels.threads import govern, stop_governing

    govern(threads)
    try:
        yield
    finally:
        stop_governing()
        numba.set_num_threads(threads)  # the governor may have left fewer


def child(engine_name: str, model: str, args) -> None:
    """Run one engine on one model in this process; print one JSON line of samples."""
    import numba

    numba.set_num_threads(args.threads)
    ids = prompt_ids(model)
    start = time.perf_counter()
    if engine_name == "refinfer":
        engine = Refinfer(model, args.numerics)
    elif engine_name == "hf":
        import torch

        torch.set_num_threads(args.threads)
        engine = HF(model)
    else:
        engine = LlamaCppPython(model, args.threads)
    loaded = time.perf_counter()
    engine.reset()
    engine.eval(ids[:8])  # the first forward call: compiles or loads the kernels
    first = time.perf_counter()
    result = {"load_s": loaded - start, "first_forward_s": first - loaded}
    for test in TESTS:  # warm-up: work buffers of every size, page-in
        run_test(engine, test, ids)
    if engine_name == "refinfer":
        import refinfer

        forward_ratio(engine, ids)
        result["threading_layer"] = numba.threading_layer()
        result["package"] = str(Path(refinfer.__file__).parent)
    samples = {test: [] for test in TESTS + ("fwd", "busy")}
    for r in range(args.repeats):
        log(f"    repetition {r + 1}/{args.repeats}")
        for test in TESTS:
            samples[test].append(run_test(engine, test, ids))
        if engine_name == "refinfer":
            samples["fwd"].append(forward_ratio(engine, ids))
        if args.busy:  # refinfer as `refinfer generate` runs without --threads: governed
            with burning(args.busy, args.busy_pin), governed(engine_name, args.threads):
                samples["busy"].append(run_test(engine, "tg128", ids, BUSY_SECONDS))
    result["samples"] = {k: v for k, v in samples.items() if v}
    print(json.dumps(result))


def run_child(engine: str, model: str, args) -> dict | str:
    """The child's result, or a one-line reason it failed."""
    cmd = [sys.executable, __file__, "--child", engine, model, "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--busy", str(args.busy),
           "--numerics", args.numerics]  # fmt: skip
    cmd += ["--busy-pin"] if args.busy_pin else []
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if done.returncode:
        return f"{engine} failed (exit status {done.returncode}; its stderr is above)"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- llama-bench -------------------------------------------------------------------------


def llama_bench(binary: Path, model: str, args, extra: list[str]) -> list[dict]:
    """llama-bench's JSON records for `extra` (-p/-n/-d ...) at --threads, --repeats."""
    cmd = [str(binary), "-m", model, "-t", str(args.threads), "-r", str(args.repeats),
           "-o", "json", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"{' '.join(cmd)}: {reason}")
    return json.loads(done.stdout)


def test_name(record: dict) -> str:
    """llama-bench's name of a record: pp512, tg128, tg128@d512."""
    name = f"pp{record['n_prompt']}" if record["n_prompt"] else f"tg{record['n_gen']}"
    return name + (f"@d{record['n_depth']}" if record.get("n_depth") else "")


def run_llama_bench(binary: Path, model: str, args) -> dict:
    """Samples (tok/s) of pp512, tg128 and tg128@d512; forward(8)/forward(1) from pp8 and
    tg16 at depth 256; tg128 with --busy processes burning."""
    runs = [["-p", str(PROMPT), "-n", str(GEN)], ["-p", "0", "-n", str(GEN), "-d", str(DEPTH)],
            ["-p", str(FWD_T), "-n", "16", "-d", str(FWD_CONTEXT)]]  # fmt: skip
    records = {}
    for extra in runs:
        for record in llama_bench(binary, model, args, extra):
            records[test_name(record)] = record
    samples = {test: records[test]["samples_ts"] for test in TESTS}
    pp, tg = records[f"pp{FWD_T}@d{FWD_CONTEXT}"], records[f"tg16@d{FWD_CONTEXT}"]
    samples["fwd"] = [
        FWD_T * g / p for p, g in zip(pp["samples_ts"], tg["samples_ts"], strict=True)
    ]
    if args.busy:  # fewer steps: a collapse must not take minutes
        busy_args = argparse.Namespace(threads=args.threads, repeats=min(args.repeats, 3))
        with burning(args.busy, args.busy_pin):
            busy = llama_bench(binary, model, busy_args, ["-p", "0", "-n", str(BUSY_GEN)])
        samples["busy"] = busy[0]["samples_ts"]
    r = records[f"pp{PROMPT}"]
    flash_attn = {-1: "auto", 0: "off", 1: "on"}.get(r["flash_attn"], r["flash_attn"])
    return {"samples": samples, "build": f"{r['build_commit']} ({r['build_number']})",
            "cpu": r["cpu_info"], "kv": f"{r['type_k']}/{r['type_v']}",
            "flash_attn": flash_attn}  # fmt: skip


def refinfer_source(package: str) -> str:
    """Which refinfer was measured: this repository's commit (and whether refinfer/ has
    uncommitted changes), or the package's directory."""
    if Path(package).resolve() != ROOT / "refinfer":
        return f"refinfer from {package}"

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout

    dirty = (
        " + uncommitted changes" if git("status", "--porcelain", "--", "refinfer").strip() else ""
    )
    return f"refinfer at {git('rev-parse', '--short', 'HEAD').strip()}{dirty}"


def choose_peer(args) -> tuple[str | None, str]:
    """(peer, a sentence saying which and why)."""
    have_bench = Path(args.llama_bench).is_file() and os.access(args.llama_bench, os.X_OK)
    have_lcp = importlib.util.find_spec("llama_cpp") is not None
    have_hf = importlib.util.find_spec("transformers") is not None
    peer = args.peer
    if peer == "auto":
        peer = "llama-bench" if have_bench else "llama-cpp-python" if have_lcp else "hf"
        peer = peer if peer != "hf" or have_hf else "none"
    if peer == "llama-bench" and not have_bench:
        sys.exit(f"{args.llama_bench}: not there (run `make llama-bench`)")
    if peer == "llama-bench":
        where = Path(args.llama_bench).resolve()
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        return peer, f"peer: llama.cpp's llama-bench ({where}), built natively"
    why = "" if args.peer != "auto" else f"no llama-bench at {args.llama_bench}; "
    if peer == "llama-cpp-python":
        return peer, (f"peer: {why}llama.cpp through llama-cpp-python (built with "
                      "-march=native, driven from Python)")  # fmt: skip
    if peer == "hf":
        why = why and f"{why}no llama-cpp-python either; "
        return peer, (f"peer: {why}HF transformers (float32 from the same GGUF), the targets "
                      "against llama.cpp not judged")  # fmt: skip
    return None, "peer: none (neither llama.cpp nor HF transformers): refinfer alone"


# ---- the table ---------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "**not met**"


def rows(name: str, ours: dict, peer: dict | None, llama: bool, args, exact=None) -> list[str]:
    """The table's rows of one model. In numerics="ggml" (issue 16) the targets are pp512
    >= 0.8x the peer, forward(8) / forward(1) <= 1.3 and decode no slower than `exact`'s
    samples (the exact mode's, same run)."""
    s, p = ours["samples"], (peer or {}).get("samples", {})
    ggml = args.numerics == "ggml"
    name = f"{name} (ggml)" if ggml else name
    med = statistics.median
    out = []

    def row(test, theirs, mine, ratio, target, ok):
        out.append(f"| {name} | {test} | {theirs} | {mine} | {ratio} | {target} | {verdict(ok)} |")

    for test, digits in (("pp512", 0), ("tg128", 1), ("tg128@d512", 1)):
        ratio = med(s[test]) / med(p[test]) if test in p else None
        theirs = median_range(p[test], digits) if test in p else "-"
        target, ok = "", None
        if test == "pp512":
            bound = 0.8 if ggml else 0.5
            target, ok = f">= {bound}x", (ratio >= bound if llama and ratio else None)
        elif ggml and exact:
            bound = med(exact["samples"][test])
            target, ok = f">= exact {bound:.1f}", med(s[test]) >= bound
        elif test == "tg128":
            target, ok = ">= 100 tok/s", med(s[test]) >= 100
        else:
            target, ok = ">= 0.85x", (ratio >= 0.85 if llama and ratio else None)
        r = f"{ratio:.2f}x" if ratio else ""
        row(test, theirs, median_range(s[test], digits), r, target, ok)
    theirs = median_range(p["fwd"], 2) if "fwd" in p else "-"
    bound = 1.3 if ggml else 1.6
    row("forward(8) / forward(1)", theirs, median_range(s["fwd"], 2), "", f"<= {bound}",
        med(s["fwd"]) <= bound)  # fmt: skip
    if "busy" in s:
        mine = med(s["busy"]) / med(s["tg128"])
        theirs = "-"
        if "busy" in p:
            theirs = f"{med(p['busy']) / med(p['tg128']):.2f}: {median_range(p['busy'], 1)}"
        row(f"decode busy / quiet ({args.busy} burning)", theirs,
            f"{mine:.2f}: {median_range(s['busy'], 1)}", "", ">= 0.40", mine >= 0.40)  # fmt: skip
    return out


def measure(fmt: str, peer: str | None, llama: bool, args) -> dict | None:
    """One model: the peer, then refinfer; the table's rows and a note (None if skipped)."""
    path = model_file(fmt)
    if path is None:
        log(f"{fmt}: no model file (run `make models`; `make peers` for Q4_K_M): skipped")
        return None
    name, model = NAMES.get(fmt, fmt), str(path)
    theirs = None
    if peer == "llama-bench":
        log(f"... llama-bench on {name}")
        try:
            theirs = run_llama_bench(Path(args.llama_bench), model, args)
        except RuntimeError as e:
            log(f"llama-bench failed: {e}")
    elif peer:
        log(f"... {peer} on {name}")
        theirs = run_child(peer, model, args)
        if isinstance(theirs, str):
            log(theirs)
            theirs = None
    out_rows, exact = [], None
    for numerics in args.numerics_list:
        args.numerics = numerics
        log(f"... refinfer (numerics {numerics}) on {name}")
        ours = run_child("refinfer", model, args)
        if isinstance(ours, str):
            log(ours)
            return None
        out_rows += rows(name, ours, theirs, llama and theirs is not None, args, exact)
        exact = ours if numerics == "exact" else exact
    return {
        "rows": out_rows,
        "note": f"{name}: refinfer load {ours['load_s']:.1f} s, first forward call "
        f"{ours['first_forward_s']:.1f} s (Numba's cache; compiling when cold), not in the "
        f"figures; load average then {os.getloadavg()[0]:.1f}.",
        "source": f"{refinfer_source(ours['package'])} (Numba {ours['threading_layer']} threads)",
        "llama_bench": theirs if peer == "llama-bench" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=MODELS, help="smollm2-135m-<fmt> (make models), gemma3")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of each test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer", default="auto", choices=["auto", *PEERS, "none"])
    p.add_argument("--llama-bench", default=str(LLAMA_BENCH), help="the llama-bench binary")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also decode with N processes burning a core each")  # fmt: skip
    p.add_argument("--busy-pin", action="store_true", help="pin them to the first N cores")
    p.add_argument("--quick", action="store_true", help="Q8_0 only, 3 repetitions")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--numerics", default="exact",
                   help="refinfer's numerics, comma-separated: exact,ggml")  # fmt: skip
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.numerics_list = args.numerics.split(",")
    if args.child:
        return child(*args.child, args)
    if args.quick:
        args.models, args.repeats = "q8_0", min(args.repeats, 3)

    peer, peer_line = choose_peer(args)
    llama = peer in ("llama-bench", "llama-cpp-python")
    log(peer_line)
    load = os.getloadavg()
    table = ["| model | test | " + (PEERS.get(peer, "peer")) + " | refinfer | ratio | target | |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    done = []
    try:
        for fmt in args.models.split(","):
            result = measure(fmt, peer, llama, args)
            if result:
                done.append(result)
                log("\n".join(result["rows"] + [result["note"]]))
    except KeyboardInterrupt:
        log("interrupted: the table holds the models measured so far")
    table += [row for r in done for row in r["rows"]]
    notes = [r["note"] for r in done]
    bench_info = next((r["llama_bench"] for r in done if r["llama_bench"]), None)
    source = done[-1]["source"] if done else ""
    end_load = os.getloadavg()
    head = [f"{cpu_name()}, {args.threads} threads, tok/s "
            f"median [min-max] of {args.repeats} repetitions, one run "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
            f"{load[0]:.1f} at the start, {end_load[0]:.1f} at the end). "
            + "; ".join(filter(None, [peer_line, source])) + "."]  # fmt: skip
    if bench_info:
        head.append(f"llama-bench build {bench_info['build']}, {bench_info['cpu']}, K/V "
                    f"{bench_info['kv']}, flash_attn {bench_info['flash_attn']}.")  # fmt: skip
    cmd = "python bench/bench_llama.py " + " ".join(sys.argv[1:])
    text = "\n".join([f"`{cmd.strip()}`", "", " ".join(head), "", *table, "", *notes]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
