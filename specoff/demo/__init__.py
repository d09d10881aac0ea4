"""The trained demo pair shipped with specoff, and its held-out report.

No pretrained checkpoint can be downloaded where specoff runs, so `tools/train_demo_pair.py`
trains its own pair on the interpreter's standard library: a small Mixtral (the target)
and a Llama several times smaller (the draft), distilled from the target so that its
greedy guesses agree with the target's. Random models have flat next-token distributions;
trained ones are peaked, which is what chain (SpecOffload) and tree (SpecExec) speculation
exploit. This module holds what the training script and the report share: which stdlib
files are trained on and which are held out, and how α and the losses are measured.
"""
from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import specoff
from specoff import SamplingParams
from specoff.humaneval import humaneval_prompts as read_humaneval
from specoff.weights import default_device, load_model, load_tokenizer, parse_dtype

# Where the shipped pair lives; SPECOFF_DEMO_DIR points at another trained pair (e.g. a fresh
# output of the training script, to check it before it replaces the shipped one).
DEMO_DIR = Path(os.environ.get("SPECOFF_DEMO_DIR") or Path(__file__).resolve().parent)

# Modules never trained on (present in Python 3.10–3.13); a name ending in "/" is a package.
HELD_OUT = ("json/", "csv.py", "textwrap.py", "argparse.py", "shutil.py", "heapq.py",
            "bisect.py", "fractions.py", "statistics.py", "graphlib.py")
# Folders left out of the data: installed packages, test suites, demos, bytecode, and the
# generated codec tables of `encodings` (hex tables, not code anyone writes).
# The test suites stay in (they are plain Python and more than double the data), except the
# tests of held-out modules (see `is_held_out`).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo",
                           "__pycache__", "encodings"})
MAX_FILE_BYTES = 200_000
EOS_TOKEN = "<|endoftext|>"  # also the BOS: every file in the token stream follows one
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
ALPHA_TOKENS = 16384  # held-out tokens behind the teacher-forced α in manifest.json and tests


def target_dir() -> Path:
    return DEMO_DIR / "target"


def draft_dir() -> Path:
    return DEMO_DIR / "draft"


def available() -> bool:
    """Whether the trained pair is installed next to this module."""
    return all((d / name).is_file() for d in (target_dir(), draft_dir())
               for name in ("config.json", "model.safetensors", "tokenizer.json"))


def manifest() -> dict:
    """What the training script recorded: files, sizes, losses, α, time (empty if absent)."""
    path = DEMO_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- data ---------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    return any(rel.startswith(h) if h.endswith("/") else rel == h for h in HELD_OUT)


def tests_held_out_module(rel: str) -> bool:
    """A test-suite file of a held-out module (test/test_json/..., test/test_csv.py): never
    trained on either, lest the module's code leak in through its tests."""
    parts = rel.split("/")
    if parts[0] != "test" or len(parts) < 2:
        return False
    stems = {h.rstrip("/").removesuffix(".py") for h in HELD_OUT}
    name = parts[1].removesuffix(".py")
    return name.startswith("test_") and name[len("test_"):] in stems


def stdlib_files(root: Optional[Path] = None) -> List[str]:
    """Every usable .py file of the stdlib (paths relative to `root`, sorted, '/'-separated)."""
    root = Path(root or stdlib_root())
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]  # never walk into site-packages
        for name in names:
            path = Path(folder) / name
            if name.endswith(".py") and path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
                files.append(path.relative_to(root).as_posix())
    return sorted(files)


def training_files(root: Optional[Path] = None) -> List[str]:
    return [f for f in stdlib_files(root) if not is_held_out(f) and not tests_held_out_module(f)]


def held_out_files(root: Optional[Path] = None) -> List[Path]:
    """The held-out modules' files in the local stdlib (absolute paths, sorted)."""
    root = Path(root or stdlib_root())
    return [root / f for f in stdlib_files(root) if is_held_out(f)]


def read_source(path: Path) -> Optional[str]:
    """A file's text, or None when it is not UTF-8 (such files are skipped everywhere)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def token_stream(tokenizer, texts: Sequence[str], eos_id: int) -> torch.Tensor:
    """EOS, file, EOS, file, ...: the layout the models were trained on, as one (N,) tensor."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a tokenizers.Tokenizer
    ids: List[int] = []
    for text in texts:
        ids.append(eos_id)
        ids += backend.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def held_out_windows(tokenizer, max_tokens: Optional[int] = None, window: int = 1024) -> torch.Tensor:
    """(n, window + 1) token windows of the held-out files' stream (a transformers or a
    tokenizers tokenizer): all of it, or with `max_tokens`, that many tokens in windows
    spread evenly over the whole stream (every module counts, not only the first)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    texts = [t for t in map(read_source, held_out_files()) if t is not None]
    stream = token_stream(backend, texts, backend.token_to_id(EOS_TOKEN))
    n = (len(stream) - 1) // window
    if max_tokens is not None:
        n = min(n, max(max_tokens // window, 1))
    starts = torch.linspace(0, len(stream) - window - 1, n).long() if n > 1 else torch.zeros(1).long()
    return torch.stack([stream[s:s + window + 1] for s in starts.tolist()])


# -- measurement --------------------------------------------------------------------------

def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


@torch.inference_mode()
def teacher_forced(target, draft, windows: torch.Tensor) -> Dict[str, float]:
    """Held-out loss of each model and greedy α: how often the draft's argmax equals the
    target's on the same prefix, over token windows (n, T + 1) as from held_out_windows.

    `target` and `draft` map (1, T) ids to logits (specoff models or transformers models).
    A draft guess is accepted in greedy chain speculation exactly when it equals the
    target's argmax, so this is the per-token acceptance rate."""
    device = next(target.parameters()).device
    sums = {"target_loss": 0.0, "draft_loss": 0.0, "agree": 0.0}
    n = 0
    for row in windows:
        row = row.to(device)
        x, y = row[None, :-1], row[1:]
        t, d = _logits(target, x)[0], _logits(draft, x)[0]
        sums["target_loss"] += torch.nn.functional.cross_entropy(t, y, reduction="sum").item()
        sums["draft_loss"] += torch.nn.functional.cross_entropy(d, y, reduction="sum").item()
        sums["agree"] += (t.argmax(-1) == d.argmax(-1)).sum().item()
        n += len(y)
    return {"target_loss": sums["target_loss"] / n, "draft_loss": sums["draft_loss"] / n,
            "alpha": sums["agree"] / n, "tokens": n}


def humaneval_prompts(n: int) -> List[str]:
    return read_humaneval()[:n]


def _row(**kw) -> dict:
    row = dict(model=None, mode=None, gamma=None, budget=None, tree_scores=None,
               tokens_per_pass=None, acceptance_rate=None, loss=None, tokens=None, tokens_per_second=None,
               matches_target=None, prompts=None, max_new_tokens=None, device=None, dtype=None)
    row.update(kw)
    return row


def evaluate(device=None, gammas=(2, 3, 4, 6, 8), budgets=(8, 16, 64, 256), n_prompts: int = 8,
             max_new_tokens: int = 64, dtype=None, heldout_tokens: int = 32768,
             target=None, draft=None, tree_scores=("learned", "draft")) -> List[dict]:
    """The held-out report of the demo pair (or of any `target`/`draft` folders).

    Rows (flat dicts, the same keys in each): held-out loss of each model (mode "heldout");
    teacher-forced greedy α on held-out text (mode "teacher_forced"); greedy generation on
    the first `n_prompts` HumanEval prompts by the target alone (mode "plain"), in chain
    mode for each γ and in tree mode for each budget and way of ranking the tree's nodes
    (`tree_scores`: learned acceptance, the draft's probabilities), with the engine's
    measured acceptance rate and tokens per target pass, and whether the output equals the target's own (in
    float32 it must; in bfloat16 a near-tie may break differently in a batched pass).
    `tokens` counts held-out tokens in the first three rows, generated tokens after them.
    """
    target, draft = Path(target or target_dir()), Path(draft or draft_dir())
    device = default_device(device)
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    where = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 dtype=str(dtype).replace("torch.", ""))
    rows = []
    tokenizer = load_tokenizer(target)
    windows = held_out_windows(tokenizer, heldout_tokens)
    t_model = load_model(target, device, dtype)
    d_model = load_model(draft, device, dtype)
    tf = teacher_forced(t_model, d_model, windows)
    del t_model, d_model
    rows.append(_row(model="target", mode="heldout", loss=tf["target_loss"], tokens=tf["tokens"], **where))
    rows.append(_row(model="draft", mode="heldout", loss=tf["draft_loss"], tokens=tf["tokens"], **where))
    rows.append(_row(model="pair", mode="teacher_forced", acceptance_rate=tf["alpha"],
                     tokens=tf["tokens"], **where))

    prompts = humaneval_prompts(n_prompts)
    params = specoff.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    common = dict(device=device, dtype=dtype, max_rows=max(len(prompts), 1))
    plain = specoff.LLM(target, **common)
    reference = _timed(plain, prompts, params)
    rows.append(_row(model="target", mode="plain", tokens_per_pass=1.0, prompts=len(prompts),
                     max_new_tokens=max_new_tokens, **reference[1], **where))
    del plain
    runs = [("chain", dict(spec="chain", draft_len=g, interleave=False), dict(gamma=g))
            for g in gammas]
    runs += [("tree", dict(spec="tree", tree_budget=b, tree_scores=scores),
              dict(budget=b, tree_scores=scores)) for scores in tree_scores for b in budgets]
    for mode, kw, key in runs:
        llm = specoff.LLM(target, draft=draft, **common, **kw)
        outputs, figures = _timed(llm, prompts, params)
        stats = llm.last_stats
        rows.append(_row(model="pair", mode=mode, tokens_per_pass=stats.tokens_per_pass,
                         acceptance_rate=stats.acceptance_rate, prompts=len(prompts),
                         max_new_tokens=max_new_tokens,
                         matches_target=outputs == reference[0], **key, **figures, **where))
        del llm
    return rows


def _timed(llm, prompts, params):
    """Greedy token ids of every prompt, and the run's tokens and tokens/s (after a warm-up)."""
    llm.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0))
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = llm.last_stats.tokens
    return [o.token_ids for o in outputs], dict(tokens=tokens, tokens_per_second=tokens / seconds)
