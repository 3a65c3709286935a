"""Does a small GenRM know more than its greedy JSON says? Expected-score pairwise accuracy.

For every held-out pair, judged in both orders, read the judge's distribution over the digits
1-5 right after ``{"score_1": `` (teacher-forced, the judge's own prompt) and take the expected
score of the response shown first. The pair goes to the response whose expected score_1 is
higher, so position bias cancels and a judge that ignores the content scores exactly 0.5:
2 forward passes per pair, no sampling. Compare with ``posttrain genrm eval`` (its greedy JSON).

    python bench/genrm_expected_score.py runs/genrm-smollm2/warmup/model --prompt-style compact
"""

from __future__ import annotations

import argparse
import time

import torch

from posttrain.environments.registry import EnvConfig, load_environment
from posttrain.genrm.preference_env import PreferenceEnv
from posttrain.models import load_model, load_tokenizer


def expected_first_scores(model, tokenizer, env: PreferenceEnv, split: str) -> list[tuple[float, float]]:
    """(expected score_1, gold ranking) per sample; samples come as pair, swapped pair, ..."""
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 6)]
    values = torch.arange(1, 6, dtype=torch.float32)
    out = []
    for sample in env.samples(split, 0):
        prompt = tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False,
                                               enable_thinking=False) + '{"score_1": '
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(ids).logits[0, -1, digits].float()
        out.append((float((torch.softmax(logits, 0) * values).sum()), sample.answer["ranking"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GenRM: model folder, hub id or built-in name")
    p.add_argument("--prompt-style", default="compact", choices=["rubric", "compact"])
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=None, help="first N pairs (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = load_environment(EnvConfig(name="genrm_preference", options={
        "both_orders": True, "prompt_style": args.prompt_style, "size": args.pairs, "test_size": args.pairs}))
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    start = time.perf_counter()
    scores = expected_first_scores(model, tokenizer, env, args.split)
    decided = [(a, b) for a, b in zip(scores[0::2], scores[1::2]) if a[1] != 3.5]  # label ties left out
    right = sum(0.5 if a[0] == b[0] else float((a[0] > b[0]) == (a[1] < 3.5)) for a, b in decided)
    print(f"{len(decided)} {args.split} pairs x both orders, {time.perf_counter() - start:.0f} s")
    print(f"expected-score pairwise accuracy  {right / len(decided):.4f}")
    print("content-blind judge               0.5000 (both orders)")


if __name__ == "__main__":
    main()
