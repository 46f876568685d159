"""`remask.py compare`: the statistics on hand-worked numbers (Student t quantiles against the printed table, paired
intervals recomputed by hand), the multiple-choice scoring against a direct computation, the SVG, and a tiny
comparison through the command line whose results.json holds everything needed to recompute its intervals."""
import json
import math
import random
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
import torch

import data
import remask
from conftest import quiet, write_jsonl
from model import Config, StableLM
from remask import TrainConfig

SVG = "{http://www.w3.org/2000/svg}"


def test_mean_and_sample_std_by_hand():
    assert remask.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert remask.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert remask.mean_std([4.0]) == (4.0, None)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert remask.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_t_cdf_against_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0, 40.0):  # df 1 is the Cauchy distribution, df 2 has a closed form too
        assert remask.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)
        assert remask.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-9)
    with pytest.raises(ValueError, match="t_quantile"):
        remask.t_quantile(0.3, 4)


def test_paired_interval_by_hand():
    # differences 1, 2, 3, 6: mean 3, std sqrt(14/3), t(0.975, 3) = 3.182 -> half width 3.182 * 2.1602 / 2
    d = remask.paired_interval([1.0, 2.0, 3.0, 6.0])
    assert (d["mean"], d["n"], d["df"]) == (3.0, 4, 3) and d["std"] == pytest.approx(math.sqrt(14 / 3))
    assert (d["low"], d["high"]) == pytest.approx((3 - 3.4370, 3 + 3.4370), abs=2e-3)
    assert d["excludes_zero"] is False
    d = remask.paired_interval([-2.0, -3.0, -4.0])  # mean -3, std 1, t(2) = 4.303: [-5.484, -0.516]
    assert (d["low"], d["high"]) == pytest.approx((-5.484, -0.516), abs=2e-3) and d["excludes_zero"] is True
    assert remask.paired_interval([0.5])["low"] is None  # one seed: no interval


def hand_runs():
    rows = [("sft", 0, 0.50, 0.25, 0.20), ("sft", 1, 0.70, 0.25, 0.40), ("remask", 1, 0.90, 0.50, 0.10),
            ("remask", 0, 0.60, 0.75, 0.30)]  # out of seed order: pairing goes by seed
    return [{"mode": m, "seed": s, "accuracy": a, "mc_accuracy": c, "eval_loss": l, "n_eval": 100}
            for m, s, a, c, l in rows]


def test_tables_and_paired_differences_by_hand():
    runs = hand_runs()
    lines = remask.markdown_table(runs, ["sft", "remask"]).splitlines()
    assert lines[0].startswith("Mode | exact match, greedy (%) | its eval SE | multiple choice")
    assert lines[1].count("---") == lines[0].count("|")  # 7 columns
    # SFT accuracies 0.5, 0.7: binomial SE on 100 problems 5.00 and 4.58 points, mean 4.79
    assert lines[2] == "SFT | 60.00 ± 14.14 | 4.79 | 25.00 ± 0.00 | 4.33 | 0.3000 ± 0.1414 | 2 |"
    # ReMask 0.6, 0.9: 4.90 and 3.00 points, mean 3.95; multiple choice 0.75, 0.5: 4.33 and 5.00, mean 4.67
    assert lines[3] == "ReMask | 75.00 ± 21.21 | 3.95 | 62.50 ± 17.68 | 4.67 | 0.2000 ± 0.1414 | 2 |"
    diff = remask.paired_differences(runs, ["sft", "remask"])["remask - sft"]
    assert diff["accuracy"]["differences"] == pytest.approx([0.1, 0.2])  # seed 0: 0.6 - 0.5, seed 1: 0.9 - 0.7
    # mean 0.15, std sqrt(0.005), t(0.975, 1) = 12.706: half width 12.706 * 0.0707 / sqrt(2) = 0.6353
    assert (diff["accuracy"]["low"], diff["accuracy"]["high"]) == pytest.approx((0.15 - 0.6353, 0.15 + 0.6353),
                                                                                abs=1e-3)
    assert diff["mc_accuracy"]["differences"] == pytest.approx([0.5, 0.25])
    row = remask.differences_table({"remask - sft": diff}).splitlines()[2]
    assert row.startswith("ReMask - SFT | +15.00 | [-48.53, +78.53] | no | +37.50 |")
    assert remask.paired_differences(runs, ["remask"]) == {}


def test_svg_chart_is_xml_with_one_series_per_line():
    series = [remask.Series("a", [0, 10, 20], [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5]),
              remask.Series("b & c", [0, 10, 20], [3.0, 2.0, 1.0])]
    root = ET.fromstring(remask.svg_chart(series, "title", "step", "value"))
    assert len(root.findall(f"{SVG}polyline")) == 2 and len(root.findall(f"{SVG}polygon")) == 1
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "b & c" in texts and "title" in texts and "3.5" in texts and "0.5" in texts


def test_multiple_choice_solutions_of_slipped_additions():
    record = data.CoTRecord("What is 57+38?", *data.addition_cot(57, 38))
    choices = remask.addition_choices(record, random.Random(0))
    assert len(choices) == remask.CHOICES and choices[0] is record
    assert all(c.prompt == record.prompt for c in choices)
    assert len({c.answer for c in choices}) == remask.CHOICES  # b+-1, b+-10: four different sums
    assert {int(c.answer) - 95 for c in choices[1:]} <= {1, -1, 10, -10}
    assert remask.addition_choices(data.CoTRecord("Say hi", "", "hi"), random.Random(0)) is None


def test_continuation_logprobs_equal_a_direct_computation():
    tok = data.embedded_tokenizer()
    torch.manual_seed(0)
    model = StableLM(Config(vocab_size=data.round_up(len(tok), 64), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)).eval()
    records = [data.CoTRecord("What is 5+7?", *data.addition_cot(5, 7)),
               data.CoTRecord("Add 123 and 9.", *data.addition_cot(123, 9))]
    sums, counts = remask.continuation_logprobs(model, tok, records, torch.device("cpu"), batch_size=2)
    for record, total, count in zip(records, sums, counts):  # one unpadded sequence at a time
        ids = tok.encode(data.format_record(record))
        context = len(tok.encode(data.cot_prompt(record.prompt)))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # (T, V)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(context, len(ids)))
        assert count == len(ids) - context and total == pytest.approx(expected, abs=1e-4)


def test_tiny_compare_through_the_cli_recomputes(tmp_path, capsys):
    flags = ["--n-train", "16", "--global-batch", "16", "--micro-batch", "16", "--seq-len", "64", "--epochs", "2",
             "--lr", "3e-3", "--log-every", "10", "--n-eval", "4", "--threads", "1", "--device", "cpu"]
    # --jobs 2: the runs go to worker processes on any machine; the check at the end repeats one in this process
    assert remask.main(["compare", "--seeds", "2", "--eval-points", "2", "--jobs", "2", "--out", str(tmp_path / "a")]
                       + flags) == 0
    out = tmp_path / "a"
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] in capsys.readouterr().out and saved["seeds"] == [0, 1] and saved["choices"] == 4
    runs = saved["runs"]
    assert [(r["mode"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in ("sft", "masked-thought",
                                                                                        "remask")]
    for run in runs:
        assert [p["step"] for p in run["curve"]] == [1, 2] and run["n_eval"] == 4
        assert run["accuracy"] == run["curve"][-1]["accuracy"] and math.isfinite(run["eval_loss"])
    for name in ("remask - sft", "masked-thought - sft"):  # the intervals, recomputed from the per-run values
        for key in ("accuracy", "mc_accuracy", "eval_loss"):
            d = saved["differences"][name][key]
            by_seed = {(r["mode"], r["seed"]): r[key] for r in runs}
            diffs = [by_seed[name.split(" - ")[0], s] - by_seed["sft", s] for s in (0, 1)]
            mean, std = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
            assert d["differences"] == pytest.approx(diffs) and d["t"] == pytest.approx(12.706, abs=1e-3)
            assert (d["low"], d["high"]) == pytest.approx((mean - 12.706 * std / math.sqrt(2),
                                                           mean + 12.706 * std / math.sqrt(2)), abs=1e-3)
    root = ET.parse(out / "curves.svg").getroot()
    assert len(root.findall(f"{SVG}polyline")) == 3 and len(root.findall(f"{SVG}polygon")) == 3
    assert ET.parse(out / "remask-seed0" / "loss.svg").getroot().find(f"{SVG}polyline") is not None
    # the same seed alone repeats its runs exactly (deterministic on a CPU, independent of the other seeds)
    args = remask.build_parser().parse_args(["compare", "--out", str(tmp_path / "b")] + flags)
    cfg = remask.config_from_args(args, {"name": "compare", **remask.COMPARE})
    again = remask.compare(cfg, seeds=[1], modes=["remask"], eval_points=2, log=quiet)
    assert again["runs"][0]["curve"] == runs[-1]["curve"]


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--eval-points", "0"], ["--n-eval", "0"], ["--jobs", "-1"]])
def test_bad_flags_are_one_error_line(flag, tmp_path, capsys):
    assert remask.main(["compare", "--out", str(tmp_path)] + flag) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert flag[0] in captured.err


def test_real_data_holds_out_a_seeded_split_of_cot_rows(tmp_path):
    rows = [{"prompt": f"What is {i}+{i}?", "rationale": f"{i}+{i}={2 * i}", "target": str(2 * i)}
            for i in range(10)]
    rows += [{"post_title": f"Say {w}", "post_text": "", "comment_text": w} for w in ("hi", "yo", "ok")]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    tok = data.embedded_tokenizer()
    cfg = TrainConfig(data=str(path), n_eval=4, seq_len=64)
    train, held = remask.load_examples(cfg, tok, log=quiet)
    assert len(held) == 4 and all(isinstance(r, data.CoTRecord) for r in held) and len(train) == 9
    train_texts = {tok.decode(e.ids.tolist()) for e in train}
    assert not any(data.format_record(r) in train_texts for r in held)
    assert remask.load_examples(cfg, tok, log=quiet)[1] == held  # the seed decides
    assert remask.load_examples(replace(cfg, seed=1), tok, log=quiet)[1] != held
    with pytest.raises(remask.TrainError, match="only 10 chain-of-thought rows"):
        remask.load_examples(replace(cfg, n_eval=11), tok, log=quiet)
