"""`python -m eval --model DIR --ask "Solve 3*x = 9 for x."`: answer questions in-process (no Ray).

The question is cleaned like the pipeline cleans it (whitespace runs collapsed), tokenized with the
tokenizer eval would use for this model, answered by the same greedy Predictor eval runs in its actors,
and printed as eval compares it (eval.metrics.normalize_answer).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from eval.metrics import normalize_answer


def encode_questions(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids as the pipeline writes them: cleaned text, ending with eos."""
    ids = tokenizer([" ".join(q.split()) for q in questions])["input_ids"]
    eos = tokenizer.eos_token_id
    return [list(x) if x[-1:] == [eos] else [*x, eos] for x in ids]


def load_answerer(model: str, tokenizer: str | None, max_new_tokens: int, batch_size: int):
    import torch

    from eval.predict import Predictor
    from eval.resolve import check_model_loads, resolve_model, resolve_tokenizer

    src = resolve_model(model)
    check_model_loads(src)
    tok = resolve_tokenizer(tokenizer, src, None)
    return Predictor(src.spec, tok, batch_size=batch_size, max_new_tokens=max_new_tokens, teacher_forced=False,
                     use_gpu=torch.cuda.is_available(), torch_threads=max(1, torch.get_num_threads()))


def answer(predictor, questions: list[str]) -> list[str]:
    if not questions:
        return []
    texts, *_ = predictor.predict(encode_questions(predictor.tokenizer, questions))
    return [normalize_answer(t) for t in texts]


def _lines(stream) -> Iterable[str]:
    for line in stream:
        yield line.rstrip("\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval --ask",
        description="Answer questions with a model: one question as an argument, or `-` for one question "
        "per line on stdin (one answer per line on stdout; an empty line gets an empty answer).",
    )
    parser.add_argument("--ask", required=True, metavar="QUESTION", help='a question, or "-" to read stdin')
    parser.add_argument("--model", required=True, help="a train output, a model directory or a hub id")
    parser.add_argument("--tokenizer", help="default: the model's own")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=32,
                        help="longest answer in tokens (default 32)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=64,
                        help="questions per generate() call when reading stdin (default 64)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be >= 1")
    predictor = load_answerer(args.model, args.tokenizer, args.max_new_tokens, args.batch_size)
    if args.ask != "-":
        print(answer(predictor, [args.ask])[0], flush=True)
        return 0
    # Answer in batches as lines arrive, so a pipe of many questions streams and uses batched generate().
    batch: list[str] = []
    for line in _lines(sys.stdin):
        batch.append(line)
        if len(batch) == args.batch_size:
            _emit(predictor, batch)
            batch = []
    _emit(predictor, batch)
    return 0


def _emit(predictor, questions: list[str]) -> None:
    asked = [i for i, q in enumerate(questions) if q.strip()]
    got = dict(zip(asked, answer(predictor, [questions[i] for i in asked]), strict=True))
    for i in range(len(questions)):
        print(got.get(i, ""), flush=True)
