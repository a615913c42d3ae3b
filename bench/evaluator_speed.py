"""Benchmark: the workbench's perplexity evaluator against the loops people use instead.

All score the same tokens of the offline model with windows of --max-length tokens:
- workbench: `perplexity.perplexity` with the batch size chosen for the device;
- plain loop: one `model(input_ids, labels=...)` per window, the workbench's windows;
- raw forward: `model(input_ids, use_cache=False)` on the workbench's batches, logits only
  (the hardware limit the evaluator is held to: it adds the loss and nothing else);
- lm-evaluation-harness `loglikelihood_rolling` (when `lm_eval` imports:
  `pip install lm-eval==0.4.13`), with windows of --max-length positions like ours;
- KL: the evaluator with the KL statistics against a recorded reference (issue 12: at most
  15% on top of an evaluation);
- half-overlapping windows (--stride, default half a window): the evaluator and the plain loop on
  the same overlapping windows, each window's first half context only (issue 12's goal: the
  evaluator at least 1.15x the plain loop there), and beside them the decoder on those windows with
  the output head on the scored positions only, nothing scored: the least any exact evaluator
  computes, so the plain loop's time over it is the ceiling of that ratio on this model and machine.
The text is cut to whole windows so that every evaluator runs the same windows (with a BOS,
ours hold it and --max-length - 1 text tokens; SmolLM2 has none, and 4,096 tokens are 8 windows).
Each is run --repeats times, interleaved: every round runs each evaluator once, back to back.
A ratio is the median over rounds of the two evaluators' times in the same round, so a machine
that slows down for a while (shared machines here ran 10-50% slower for minutes) slows both
sides of a ratio alike; the rates shown are the fastest runs. Ratios are printed last.
Run: .venv/bin/python bench/evaluator_speed.py [--tokens 4096] [--max-length 512]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from workbench.core.config import auto_batch_size
from workbench.metrics import divergence, perplexity
from workbench.sources import data, models

import record


def plain_loop(model, ids: list[int], max_length: int, bos: int | None, stride: int | None = None) -> tuple[float, int]:
    """The workbench's windows, one at a time, loss from transformers (tokens before a window's
    `first` are context only, as in the evaluator)."""
    nll, count = 0.0, 0
    spans = perplexity.windows(len(ids), max_length, stride or max_length, bos is not None)[0]
    for begin, end, first in spans:
        row = ([bos] if bos is not None else []) + ids[begin:end]
        labels = torch.tensor([row])
        labels[0, : first - begin + (bos is not None)] = -100
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row]), labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        nll, count = nll + loss * n, count + n
    return math.exp(nll / count), count


def raw_forward(model, ids: list[int], max_length: int, batch_size: int, bos: int | None) -> int:
    """Forward passes over the evaluator's batches (logits of every position), nothing scored."""
    spans = perplexity.windows(len(ids), max_length, max_length, bos is not None)[0]
    tokens = 0
    for batch in perplexity._equal_length_batches(spans, batch_size):
        rows = [([bos] if bos is not None else []) + ids[begin:end] for begin, end, _ in batch]
        with torch.no_grad():
            model(input_ids=torch.tensor(rows), use_cache=False).logits.float()
        tokens += sum(len(r) for r in rows)
    return tokens


def decoder_and_head(model, ids: list[int], max_length: int, stride: int, batch_size: int, bos: int | None) -> int:
    """What any exact evaluator must compute on the evaluator's windows, and no more: the decoder on
    every position, the output head on the positions that predict a scored token; nothing scored.
    The fastest an evaluator can be: the plain loop's time over this one is the ceiling of its ratio."""
    spans = perplexity.windows(len(ids), max_length, stride, bos is not None)[0]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    offset = 1 if bos is not None else 0
    scored = 0
    for batch in perplexity._equal_length_batches(spans, batch_size):
        rows = [([bos] if bos is not None else []) + ids[begin:end] for begin, end, _ in batch]
        with torch.no_grad():
            hidden = decoder(input_ids=torch.tensor(rows), use_cache=False)[0]
            for row, (begin, _, first) in zip(hidden, batch):
                predicting = row[first - begin + offset - 1 : -1]  # position t predicts token t + 1
                head(predicting)
                scored += len(predicting)
    return scored


def lm_eval_rolling(model, tokenizer, text: str, max_length: int, batch_size: int):
    """lm-evaluation-harness's rolling log-likelihood of `text`; None when lm_eval is not installed."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    return loglikelihood, len(lm.tok_encode(text))


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="at most this many (cut to whole windows)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="overlapping case's step (default: half a window)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    source = models.resolve("bundled")
    tokenizer = models.load_tokenizer(source)
    ids = data.eval_tokens(tokenizer, data.builtin_eval_text(), args.tokens)
    bos = perplexity.expects_bos(tokenizer)
    per_window = args.max_length - (bos is not None)
    # whole windows: the same ones for every evaluator
    ids = ids[: max(len(ids) // per_window, 1) * per_window]
    model = models.load_model(source, "cpu")
    batch = auto_batch_size("cpu")
    length = args.max_length
    stride = args.stride or length // 2
    perplexity.perplexity(model, ids[:600], length, length, bos_token_id=bos)  # warm-up
    recording = divergence.Divergence.recording()
    perplexity.perplexity(model, ids, length, length, batch, bos, divergence=recording)
    reference = recording.recorded_reference()
    text = tokenizer.decode(ids)

    runs = {
        "workbench": lambda: perplexity.perplexity(model, ids, length, length, batch, bos),
        "workbench + KL": lambda: perplexity.perplexity(
            model, ids, length, length, batch, bos, divergence=divergence.Divergence.against(reference)
        ),
        "plain loop": lambda: plain_loop(model, ids, length, bos),
        "raw forward": lambda: raw_forward(model, ids, length, batch, bos),
        "lm-eval rolling": lambda: lm_eval_rolling(model, tokenizer, text, length, batch),
        "workbench, overlapping": lambda: perplexity.perplexity(model, ids, length, stride, batch, bos),
        "plain loop, overlapping": lambda: plain_loop(model, ids, length, bos, stride),
        "decoder + head, overlapping": lambda: decoder_and_head(model, ids, length, stride, batch, bos),
    }
    values, seconds = {}, {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            values[name], took = timed(run)
            seconds[name].append(took)
    if values["lm-eval rolling"] is None:
        del seconds["lm-eval rolling"]
    best = {name: min(times) for name, times in seconds.items()}

    def slower(name: str, than: str) -> float:
        """Median over rounds of time(name) / time(than), both measured in the same round."""
        return statistics.median(a / b for a, b in zip(seconds[name], seconds[than]))

    ours = values["workbench"]
    tokens = {
        "workbench": ours.n_tokens,
        "workbench + KL": ours.n_tokens,
        "plain loop": values["plain loop"][1],
        "raw forward": values["raw forward"],
        "workbench, overlapping": values["workbench, overlapping"].n_tokens,
        "plain loop, overlapping": values["plain loop, overlapping"][1],
        "decoder + head, overlapping": values["decoder + head, overlapping"],
    }
    setup = (
        f"model {source.label}, {len(ids)} tokens, windows of {length}, workbench batch {batch} (chosen for cpu), "
        f"{torch.get_num_threads()} threads, {args.repeats} rounds; overlapping case: stride {stride}"
    )
    difference = abs(ours.ppl / values["plain loop"][0] - 1)
    overlapping = values["workbench, overlapping"].ppl, values["plain loop, overlapping"][0]
    agreement = (
        f"perplexity: workbench {ours.ppl:.5f}, plain loop {values['plain loop'][0]:.5f} "
        f"(relative difference {difference:.1e}); overlapping: workbench {overlapping[0]:.5f}, "
        f"plain loop {overlapping[1]:.5f}"
    )
    print(setup)
    print(agreement)
    if values["lm-eval rolling"] is not None:
        loglikelihood, n = values["lm-eval rolling"]
        tokens["lm-eval rolling"] = n
        lm_eval = f"lm-eval: {n} tokens, perplexity {math.exp(-loglikelihood / n):.5f} (scores the first token too, after EOT)"
    else:
        lm_eval = "lm-eval: not installed (pip install lm-eval==0.4.13), its ratio is not measured"
    print(lm_eval)
    for name, n in tokens.items():
        print(
            f"{name:16s} {n / best[name]:7.0f} tok/s fastest  (rounds: {', '.join(f'{t:.2f}' for t in seconds[name])} s)"
        )

    def speed_ratio(other: str, ours: str = "workbench") -> float:  # our tok/s over the other's, per round
        return slower(other, ours) * tokens[ours] / tokens[other]

    ratios = {
        "ratio workbench / plain loop": (speed_ratio("plain loop"), ">= 1.0"),
        "overlapping: workbench / plain loop": (
            speed_ratio("plain loop, overlapping", "workbench, overlapping"),
            ">= 1.15",
        ),
    }
    if "lm-eval rolling" in tokens:
        ratios["ratio workbench / lm-eval rolling"] = (speed_ratio("lm-eval rolling"), ">= 1.0")
    ratios["ratio workbench / raw forward"] = (speed_ratio("raw forward"), ">= 0.95")
    ratios["KL overhead (time with / without)"] = (slower("workbench + KL", "workbench"), "<= 1.15")
    for name, (ratio, goal) in ratios.items():
        print(f"{name + ':':38} {ratio:.2f}x (goal {goal})")
    summary = {f"{name} (x)": record.goal(round(ratio, 2), goal) for name, (ratio, goal) in ratios.items()}
    ceiling = speed_ratio("plain loop, overlapping", "decoder + head, overlapping")
    print(
        f"{'overlapping: ceiling (decoder + head):':38} {ceiling:.2f}x (the most an exact evaluator can reach "
        "over the plain loop: the decoder runs on every position of every window)"
    )
    summary["overlapping: ceiling, decoder + head / plain loop (x)"] = round(ceiling, 2)
    summary["perplexity relative difference, workbench vs plain loop"] = float(f"{difference:.1e}")
    rows = [
        {
            "evaluator": name,
            "tokens": n,
            "fastest (tok/s)": round(n / best[name]),
            "rounds (s)": [round(t, 2) for t in seconds[name]],
        }
        for name, n in tokens.items()
    ]
    record.save("evaluator_speed", summary, rows, [setup, agreement, lm_eval])


if __name__ == "__main__":
    main()
