"""`remask.py compare`: the protocol on a tiny budget gives a well-formed table and results.json, seeds repeat
exactly, the statistics are the textbook ones, and real data holds out a seeded split of its CoT rows."""
import json
import math
import re
from dataclasses import replace

import pytest

import data
import remask
from remask import TrainConfig


def test_mean_and_sample_std_by_hand():
    assert remask.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert remask.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert remask.mean_std([4.0]) == (4.0, None)


def test_table_shape_with_error_bars():
    runs = [{"mode": m, "seed": s, "accuracy": a, "eval_loss": l} for m, s, a, l in
            [("sft", 0, 0.5, 0.2), ("sft", 1, 0.7, 0.4), ("remask", 0, 0.9, 0.1), ("remask", 1, 0.9, 0.1)]]
    lines = remask.markdown_table(runs, ["sft", "remask"]).splitlines()
    assert lines[0].startswith("Model | held-out exact match") and lines[1] == "---|---|---|---|"
    assert lines[2] == "SFT | 60.00 ± 14.14 | 0.3000 ± 0.1414 | 2 |"
    assert lines[3] == "ReMask | 90.00 ± 0.00 | 0.1000 ± 0.0000 | 2 |"


def test_tiny_compare_is_well_formed_and_repeats(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "a"), n_train=32, global_batch=16, micro_batch=16, seq_len=64, digits=2,
                      epochs=1, lr=3e-3, log_every=10, save_every=0, n_eval=4, threads=1, device="cpu")
    lines = []
    first = remask.compare(cfg, seeds=[0], log=lines.append)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["table"] == first["table"] and saved["seeds"] == [0]
    assert [r["mode"] for r in saved["runs"]] == ["sft", "masked-thought", "remask"]
    for run in saved["runs"]:
        assert 0 <= run["accuracy"] <= 1 and math.isfinite(run["eval_loss"]) and run["seconds"] > 0
    rows = first["table"].splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["SFT", "Masked Thought", "ReMask"]
    assert all(re.fullmatch(r"[\w ]+ \| \d+\.\d\d \| \d+\.\d{4} \| 1 \|", r) for r in rows)
    assert any(first["table"] in line for line in lines) and any("3 runs (3 modes x 1 seeds)" in l for l in lines)
    again = remask.compare(replace(cfg, out=str(tmp_path / "b")), seeds=[0], log=lambda m: None)
    for a, b in zip(first["runs"], again["runs"]):
        assert (a["accuracy"], a["eval_loss"], a["final_loss"]) == (b["accuracy"], b["eval_loss"], b["final_loss"])


def test_real_data_holds_out_a_seeded_split_of_cot_rows(tmp_path):
    rows = [{"prompt": f"What is {i}+{i}?", "rationale": f"{i}+{i}={2 * i}", "target": str(2 * i)}
            for i in range(10)]
    rows += [{"post_title": f"Say {w}", "post_text": "", "comment_text": w} for w in ("hi", "yo", "ok")]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = data.embedded_tokenizer()
    cfg = TrainConfig(data=str(path), n_eval=4, seq_len=64)
    train, held = remask.load_examples(cfg, tok, log=lambda m: None)
    assert len(held) == 4 and all(isinstance(r, data.CoTRecord) for r in held) and len(train) == 9
    train_texts = {tok.decode(e.ids.tolist()) for e in train}
    assert not any(data.format_record(r) in train_texts for r in held)
    assert remask.load_examples(cfg, tok, log=lambda m: None)[1] == held  # the seed decides
    assert remask.load_examples(replace(cfg, seed=1), tok, log=lambda m: None)[1] != held
    with pytest.raises(remask.TrainError, match="only 10 chain-of-thought rows"):
        remask.load_examples(replace(cfg, n_eval=11), tok, log=lambda m: None)
