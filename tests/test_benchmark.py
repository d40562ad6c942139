"""`florence-vl bench` on the tiny shapes: the table, the JSON keys, and the facts the ratios rest on (the original
algorithm computes the same features; the memory ours saves is the Florence-2 decoder)."""

import json

import torch
from transformers import AutoModelForCausalLM, StoppingCriteriaList

from florence_vl_hf import benchmark
from florence_vl_hf.cli import main
from florence_vl_hf.tiny import tiny_config


def test_bench_prints_the_table_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    argv = ["bench", "--shapes", "tiny", "--json", str(path), "--device", "cpu", "--repeats", "1", "--warmup", "0",
            "--decode-tokens", "4", "--batch-size", "2"]  # fmt: skip
    path.parent.mkdir()  # a previous run on a machine 1000x faster: its peak is compared with this run's
    fast = {"dtype": "float32", "matmul_peak": {"flops_per_second": 1e15, "spread": 0.01}}
    path.write_text(json.dumps({"shapes": {"tiny": fast}}))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tiny = json.loads(path.read_text())["shapes"]["tiny"]
    assert "warning: tiny: the float32 matmul peak is" in printed and "below the previous run's 1000000" in printed
    assert tiny["matmul_peak"]["flops_per_second"] == tiny["matmul_peak_flops_per_second"] > 0
    assert set(tiny["matmul_peak"]["by_size"]) == {"1024", "2048", "4096"} and 0 <= tiny["matmul_peak"]["spread"] < 1
    for key, row in (("vision_speedup_vs_original", "vision speed-up vs original, batch 1"),
                     ("decode_overhead_vs_bare_llm", "decode overhead vs bare LLM, batch 1"),
                     ("peak_memory_ratio_vs_original", "peak memory ratio vs original")):  # fmt: skip
        assert tiny[key] > 0 and row in printed
    assert "| tiny (float32) |" in printed

    # The baseline really is the same algorithm on the same weights: native Florence-2 through generate() gives
    # our fused features, and the bare LLM has exactly the LLM's parameters.
    assert tiny["features_max_relative_difference"] < 1e-5
    llm = AutoModelForCausalLM.from_config(tiny_config("phi3").text_config)
    assert tiny["parameters"]["bare_llm"] == sum(p.numel() for p in llm.parameters())
    # What ours does not hold is the Florence-2 decoder (and its LM head, tied to the shared embeddings).
    saved = tiny["weights_bytes"]["original"] - tiny["weights_bytes"]["ours"]
    assert saved == tiny["florence2_decoder_bytes"] > 0
    assert tiny["vision_flops"]["original"] > tiny["vision_flops"]["ours"] > 0
    assert tiny["num_image_tokens"] == tiny_config("phi3").num_image_tokens
    assert tiny["decode_tokens_per_second"]["ours_batch2"] == 2000 / tiny["decode_ms_per_token"]["ours_batch2"]
    assert 0 < tiny["decode_bandwidth_fraction"] and tiny["memory_bandwidth_bytes_per_second"] > 0
    for measured in (*tiny["vision_seconds_per_image"].values(), *tiny["decode_ms_per_token"].values(),
                     *tiny["peak_memory_bytes"].values()):  # fmt: skip
        assert measured > 0


def test_unknown_shape_is_named(capsys):
    assert main(["bench", "--shapes", "tiny,huge"]) == 1
    assert capsys.readouterr().err.strip() == "error: --shapes: unknown shape(s) huge; choose from tiny, base, large"
    assert main(["bench", "--shapes", ","]) == 1
    assert capsys.readouterr().err.strip() == "error: --shapes: no shape in ','; choose from tiny, base, large"
    assert main(["bench", "--decode-tokens", "2"]) == 1
    assert capsys.readouterr().err.strip() == "error: --decode-tokens must be at least 3, got 2"


def test_a_shape_that_does_not_fit_is_skipped_and_reported(monkeypatch):
    monkeypatch.setattr(benchmark, "_available_memory", lambda device: 2**30)
    result = benchmark.bench_shape("large", torch.device("cpu"))
    assert "skipped" in result and "1.0 GiB available" in result["skipped"]
    report = {"settings": {"batch_size": 8}, "shapes": {"large": result}}
    assert "large: skipped, needs about" in benchmark.format_table(report)


def test_step_clock_ticks_once_per_generated_token(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image}, {"type": "text", "text": "Hi?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    clock = benchmark.StepClock(torch.device("cpu"))
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 and len(clock.ticks) == 5
    clock.ticks = [10.0, 10.5, 10.6, 10.8, 11.8]  # intervals 0.5, 0.1, 0.2, 1.0: the median is 0.35
    assert abs(clock.per_token() - 0.35) < 1e-12


def test_interleaved_warms_up_then_alternates_the_order_and_takes_medians():
    calls = []
    values = {"a": iter([9.0, 1.0, 3.0, 2.0]), "b": iter([9.0, 5.0, 4.0, 6.0])}

    def measure(name):
        def run():
            calls.append(name)
            return next(values[name])

        return run

    result = benchmark.interleaved({"a": measure("a"), "b": measure("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert result == {"a": 2.0, "b": 5.0}


def test_the_matmul_peak_is_the_best_size_s_best_repeat_and_its_spread(monkeypatch):
    # Hand-made timings: size 2 runs 2*2**3 = 16 FLOP in at best 1 s (median 2 s), size 4 128 FLOP in at best 2 s.
    timings = {2: [1.0, 2.0, 3.0], 4: [2.0, 2.5, 4.0]}
    monkeypatch.setattr(benchmark, "_timings", lambda fn, device, repeats: timings[fn().shape[0]])
    peak = benchmark.matmul_peak(torch.device("cpu"), torch.float32, sizes=(2, 4), repeats=3)
    assert peak["by_size"] == {"2": 16.0, "4": 64.0}
    assert peak["flops_per_second"] == 64.0 and peak["size"] == 4
    assert peak["spread"] == 1 - 2.0 / 2.5


def test_a_peak_below_the_previous_run_s_by_more_than_the_spread_is_a_warning():
    def report(flops, spread, dtype="bfloat16"):
        return {"shapes": {"large": {"dtype": dtype, "matmul_peak": {"flops_per_second": flops, "spread": spread}}}}

    assert benchmark.peak_warnings(report(95e9, 0.06), report(100e9, 0.02)) == []  # within the spread
    (warning,) = benchmark.peak_warnings(report(80e9, 0.05), report(100e9, 0.02))
    assert warning.startswith("warning: large: the bfloat16 matmul peak is 80 GFLOP/s, 20% below the previous run's 100")
    assert benchmark.peak_warnings(report(80e9, 0.05), report(100e9, 0.02, dtype="float32")) == []
    assert benchmark.peak_warnings(report(80e9, 0.05), None) == []


def test_dtype_applies_to_every_shape(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "tiny", "--dtype", "bfloat16", "--json", str(path), "--device", "cpu", "--repeats",
            "1", "--warmup", "0", "--decode-tokens", "3", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "| tiny (bfloat16) |" in capsys.readouterr().out
    tiny = json.loads(path.read_text())["shapes"]["tiny"]
    assert tiny["dtype"] == "bfloat16" and tiny["matmul_peak"]["flops_per_second"] > 0
    assert tiny["features_max_relative_difference"] < 2e-2  # both sides in bf16: the same computation
    assert benchmark.get_shape("large").dtype == torch.bfloat16
    assert benchmark.get_shape("large", "float32").dtype == torch.float32
