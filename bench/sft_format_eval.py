"""Share of well-formed outputs on the held-out arithmetic prompts, thinking on and off.

    python bench/sft_format_eval.py --model smollm2-135m-instruct
    python bench/sft_format_eval.py --model runs/sft-smollm2-reasoning/model

Thinking on: the prompt ends in ``<think>\\n``; well-formed = reasoning, ``</think>``, an answer.
Thinking off: the prompt ends in ``<think></think>``; well-formed = an answer with no think tags.
Also reports answer accuracy (the number after "The answer is" or the last number) for colour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def _number(text: str) -> int | None:
    nums = re.findall(r"-?\d+", text.split("answer is")[-1])
    return int(nums[0]) if nums else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--show", type=int, default=1, help="print this many completions per mode")
    args = parser.parse_args()

    from posttrain import chat_template, models
    from posttrain.sft.arith import well_formed
    from posttrain.sft.data import shipped_dataset

    lines = (shipped_dataset("arith_reasoning") / "test.jsonl").read_text().splitlines()[: args.n]
    rows = [json.loads(line) for line in lines]
    answers = [r["answer"] for r in rows]
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model, device="cpu")
    result = {"model": args.model, "n": len(rows)}
    for thinking in (True, False):
        prompts = [chat_template.render(tokenizer, r["messages"][:1], add_generation_prompt=True,
                                        enable_thinking=thinking) for r in rows]
        t0 = time.perf_counter()
        outs = _generate(model, tokenizer, prompts, args.max_new_tokens, args.batch)
        key = "think_on" if thinking else "think_off"
        ok = [well_formed(o, thinking) for o in outs]
        correct = [_number(o) == a for o, a in zip(outs, answers)]
        result[key] = {"well_formed": sum(ok) / len(ok), "correct": sum(correct) / len(correct),
                       "seconds": round(time.perf_counter() - t0, 1)}
        for o in outs[: args.show]:
            print(f"[{key}] {o!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
