"""`remask.py compare`: the statistics on hand-worked numbers (Student t quantiles against the printed table, paired
intervals recomputed by hand, the sign test and the smallest detectable difference against closed forms), the
multiple-choice scoring against a direct computation, the SVG, --seeds, pooling results.json written here (and its
refusals), and a tiny comparison through the command line whose results.json holds everything needed to recompute
its statistics and names the machine of every run."""
import json
import math
import random
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace

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


@pytest.mark.parametrize("leads, trails, p", [(4, 1, 12 / 32), (5, 0, 2 / 32), (1, 4, 12 / 32), (0, 0, 1.0),
                                              (3, 3, 1.0), (9, 1, 2 * (1 + 10) / 1024)])
def test_sign_test_by_hand(leads, trails, p):
    # two-sided: 2 x P(X <= min) for X ~ Binomial(leads + trails, 1/2), at most 1; 4 of 5: 2 x (1 + 5) / 32
    assert remask.sign_test(leads, trails) == pytest.approx(p)


def test_smallest_detectable_difference_against_closed_forms():
    # df 1 (Cauchy): t(p) = tan(pi (p - 1/2)); df 2: t(p) = (2p - 1) / sqrt(2 p (1 - p))
    d = remask.paired_interval([1.0, 3.0])  # std sqrt(2), n 2
    expected = (math.tan(math.pi * 0.475) + math.tan(math.pi * 0.3)) * math.sqrt(2) / math.sqrt(2)
    assert d["mde"] == pytest.approx(expected, rel=1e-6)
    d = remask.paired_interval([-2.0, -3.0, -4.0])  # std 1, n 3
    df2 = [(2 * p - 1) / math.sqrt(2 * p * (1 - p)) for p in (0.975, 0.8)]
    assert d["mde"] == pytest.approx(sum(df2) / math.sqrt(3), rel=1e-6)  # (4.303 + 1.061) / sqrt(3) = 3.097
    assert remask.paired_interval([0.5])["mde"] is None


@pytest.mark.parametrize("text, seeds", [("5", [0, 1, 2, 3, 4]), ("20-23", [20, 21, 22, 23]),
                                         ("0-2,10", [0, 1, 2, 10]), ("7-7", [7]), (" 3 - 4 , 9 ", [3, 4, 9])])
def test_seeds_are_a_count_a_range_or_a_list(text, seeds):
    assert remask.parse_seeds(text) == seeds
    assert remask.seed_ranges(seeds) == {"5": "0-4", " 3 - 4 , 9 ": "3-4,9"}.get(text, text)  # and back


@pytest.mark.parametrize("text, says", [("0", "at least 1"), ("4-2", "runs backwards"), ("x", "not a seed"),
                                        ("1,,2", "not a seed"), ("-1", "not a seed"), ("0-4,", "not a seed")])
def test_bad_seeds_are_one_line(text, says):
    with pytest.raises(ValueError, match=says) as caught:
        remask.parse_seeds(text)
    assert str(caught.value).startswith("--seeds") and "\n" not in str(caught.value)


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
    assert row.startswith("ReMask - SFT | +15.00 | [-48.53, +78.53] | no | +37.50 |") and row.endswith("| 2 |")
    # ahead on both seeds in exact match (p = 2 / 4); the loss, lower is better: 0.30 vs 0.20 behind, 0.10 vs 0.40 ahead
    assert [diff["accuracy"][k] for k in ("leads", "ties", "trails", "sign_p", "seeds")] == [2, 0, 0, 0.5, [0, 1]]
    assert [diff["eval_loss"][k] for k in ("leads", "ties", "trails", "sign_p")] == [1, 0, 1, 1.0]
    row = remask.sign_table({"remask - sft": diff}).splitlines()[2]
    assert row.startswith(f"ReMask - SFT | 2 / 0 / 0 | 0.5 | {diff['accuracy']['mde'] * 100:.2f} |")
    assert remask.paired_differences(runs, ["remask"]) == {}


def test_pairing_goes_by_seed_and_counts_ties():
    runs = hand_runs() + [{"mode": "remask", "seed": 2, "accuracy": 0.3, "mc_accuracy": 0.5, "eval_loss": 0.2,
                           "n_eval": 100}]  # no SFT run of seed 2: not paired
    runs[2]["accuracy"] = 0.7  # seed 1 ties SFT
    diff = remask.paired_differences(runs, ["sft", "remask"])["remask - sft"]["accuracy"]
    assert diff["seeds"] == [0, 1] and diff["differences"] == pytest.approx([0.1, 0.0])
    assert (diff["leads"], diff["ties"], diff["trails"], diff["sign_p"]) == (1, 1, 0, 1.0)


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
    # every run names this machine, computed on one thread whichever worker ran it
    here = remask.machine(torch.device("cpu"))
    assert all(run["machine"] == {**here, "threads": 1} for run in runs)
    assert saved["machines"] == [{**here, "threads": 1, "runs": 6}] and here["torch"] == torch.__version__
    for name in ("remask - sft", "masked-thought - sft"):  # the intervals, recomputed from the per-run values
        for key in ("accuracy", "mc_accuracy", "eval_loss"):
            d = saved["differences"][name][key]
            by_seed = {(r["mode"], r["seed"]): r[key] for r in runs}
            diffs = [by_seed[name.split(" - ")[0], s] - by_seed["sft", s] for s in (0, 1)]
            mean, std = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
            assert d["differences"] == pytest.approx(diffs) and d["t"] == pytest.approx(12.706, abs=1e-3)
            assert (d["low"], d["high"]) == pytest.approx((mean - 12.706 * std / math.sqrt(2),
                                                           mean + 12.706 * std / math.sqrt(2)), abs=1e-3)
            better = -1 if key == "eval_loss" else 1
            assert d["leads"] == sum(better * x > 0 for x in diffs) and d["seeds"] == [0, 1]
    root = ET.parse(out / "curves.svg").getroot()
    assert len(root.findall(f"{SVG}polyline")) == 3 and len(root.findall(f"{SVG}polygon")) == 3
    assert ET.parse(out / "remask-seed0" / "loss.svg").getroot().find(f"{SVG}polyline") is not None
    # the same seed alone repeats its runs exactly (deterministic on a CPU, independent of the other seeds)
    args = remask.build_parser().parse_args(["compare", "--out", str(tmp_path / "b")] + flags)
    cfg = remask.config_from_args(args, {"name": "compare", **remask.COMPARE})
    again = remask.compare(cfg, seeds=[1], modes=["remask"], eval_points=2, log=quiet)
    assert again["runs"][0]["curve"] == runs[-1]["curve"] and again["runs"][0]["machine"] == runs[-1]["machine"]


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--seeds", "3-1"], ["--seeds", "0-2,1"], ["--eval-points", "0"],
                                  ["--n-eval", "0"], ["--jobs", "-1"], ["--modes", "sft", "sft"]])
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


def part(seeds, modes, machine=None, **config):
    """A results.json of compare, written by hand: runs whose metrics are simple functions of seed and mode, no
    machine records unless given (as remask.py wrote them before it recorded machines)."""
    gain = {"sft": 0.0, "masked-thought": -0.05, "remask": 0.04}
    runs = []
    for seed in seeds:
        for mode in modes:
            accuracy = 0.2 + gain[mode] * (1 + seed % 3) + 0.01 * seed
            end = {"accuracy": accuracy, "mc_accuracy": 0.5 + gain[mode], "eval_loss": 0.3 - gain[mode]}
            curve = [{"step": 192, "accuracy": accuracy / 4, "mc_accuracy": None, "eval_loss": 0.5},
                     {"step": 384, **end}]
            runs.append({"mode": mode, "seed": seed, **end, "n_eval": 500, "final_loss": 0.2, "seconds": 200.0,
                         **({"machine": machine} if machine else {}), "curve": curve})
    return {"seconds": 1000.0, "device": "CPU", "torch": "2.13.0+cpu", "date": "2026-12-03", "seeds": list(seeds),
            "modes": list(modes), "eval_points": 2, "choices": 4,
            "config": asdict(replace(TrainConfig(**remask.COMPARE), **config)), "runs": runs}


def write(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return str(path)


def test_pooling_two_parts_is_one_report_over_all_seeds(tmp_path, capsys):
    machine = {**remask.machine(torch.device("cpu")), "threads": 1}
    old = write(tmp_path / "a" / "results.json", part([0, 1, 2], remask.MODES))  # no machines: an older remask.py
    new = write(tmp_path / "b" / "results.json", part([3, 4], ["sft", "remask"], machine, out="elsewhere", threads=2))
    assert remask.main(["compare-report", old, new, "--out", str(tmp_path / "pooled")]) == 0
    saved = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert saved["seeds"] == [0, 1, 2, 3, 4] and saved["modes"] == ["sft", "masked-thought", "remask"]
    assert len(saved["runs"]) == 13 and saved["config"]["out"] == str(tmp_path / "pooled")
    alone = part(range(5), ["sft", "remask"])["runs"] + part(range(3), ["masked-thought"])["runs"]
    expected = remask.paired_differences(alone, ["sft", "masked-thought", "remask"])
    for name, n in (("remask - sft", 5), ("masked-thought - sft", 3)):  # Masked Thought pairs on its 3 seeds
        for key in ("accuracy", "mc_accuracy", "eval_loss"):
            assert saved["differences"][name][key]["n"] == n
            assert saved["differences"][name][key] == expected[name][key]  # JSON keeps every float exactly
    assert [line.split(" | ")[-1] for line in saved["table"].splitlines()[2:5]] == ["5 |", "3 |", "5 |"]
    unknown = {**dict.fromkeys(machine, "unknown"), "torch": "2.13.0+cpu"}
    assert saved["machines"] == [{**unknown, "runs": 9}, {**machine, "runs": 4}]
    assert [p["seeds"] for p in saved["parts"]] == ["0-2", "3-4"] and saved["seconds"] == 2000.0
    out = capsys.readouterr().out
    assert "9 runs on a machine not recorded" in out and f"4 runs on {machine['cpu']}" in out
    root = ET.parse(tmp_path / "pooled" / "curves.svg").getroot()
    assert "Masked Thought (n=3)" in [t.text for t in root.iter(f"{SVG}text")]


@pytest.mark.parametrize("second, says", [
    (part([3], ["sft"], n_train=1408), "different protocols (n_train 2048 vs 1408)"),
    (part([3], ["sft"], n_eval=200), "n_eval 500 vs 200"),
    (part([1, 2], ["remask"]), "the remask run of seed 1 is in"),
    (part([3, 3], ["sft"]), "the sft run of seed 3 is in"),  # twice in one file
])
def test_pooling_refuses_other_protocols_and_runs_counted_twice(second, says, tmp_path, capsys):
    first = write(tmp_path / "a" / "results.json", part([0, 1], ["sft", "remask"]))
    other = write(tmp_path / "b" / "results.json", second)
    assert remask.main(["compare-report", first, other, "--out", str(tmp_path / "pooled")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err
    assert (first in err or says.startswith("the sft")) and other in err
    assert not (tmp_path / "pooled").exists()
