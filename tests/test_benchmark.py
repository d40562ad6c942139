"""`florence-vl bench` on the tiny shapes: the table, the JSON keys, and the facts the ratios rest on (the original
algorithm computes the same features; the memory ours saves is the Florence-2 decoder)."""

import json

import pytest
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
    # The floors: the first token's FLOPs (vision included) at the matmul peak, the decode step's bytes at the read
    # bandwidth; the vision pass is part of the first token's work.
    assert tiny["first_token_flops"] > tiny["vision_flops"]["ours"]
    assert tiny["time_to_first_token_floor_seconds"] == tiny["first_token_flops"] / tiny["matmul_peak_flops_per_second"]
    assert tiny["time_to_first_token_over_floor"] > 1 and tiny["decode_over_floor"] > 1
    assert abs(tiny["decode_over_floor"] * tiny["decode_bandwidth_fraction"] - 1) < 1e-9
    assert tiny["isolated"] is False and "| sides measured | together, interleaved |" in printed


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


def _sides(ours_times, original_times, **info):
    """Hand-made measurements of both sides, in the shape `summarize` receives them."""
    features = torch.ones(1, 2, 3)
    ours_info = {"vision_flops": 100, "parameters": (10, 40), "features": features, "prefill_flops": 1000,
                 "first_token_flops": 1200, "num_image_tokens": 2, "prompt_tokens": 9, "decode_bytes_per_step": 500,
                 **info}  # fmt: skip
    original_info = {"vision_flops": 300, "parameters": (12, 48), "features": features * 1.01,
                     "bare_llm_parameters": (6, 24), "florence2_decoder_bytes": 8}  # fmt: skip
    return {
        "ours": {"times": ours_times, "info": ours_info, "memory": {"peak_bytes": 50}, "extras": {"prefill": 2.0}},
        "original": {"times": original_times, "info": original_info, "memory": {"peak_bytes": 100}},
    }


def test_the_floors_and_ratios_are_computed_from_the_measurements():
    times = {"vision_batch1": 1.0, "vision_batch2": 1.5, "first_token": 4.0, "decode_batch1": 0.02,
             "decode_batch2": 0.03, "decode_batch1_static_cache": 0.025}  # fmt: skip
    original = dict(times, vision_batch1=3.0, vision_batch2=6.0, first_token=9.0, decode_batch1=0.01)
    settings = benchmark.BenchSettings(batch_size=2)
    peak = {"flops_per_second": 400.0, "size": 2048, "spread": 0.01}
    result = benchmark.summarize(_sides(times, original), settings, peak, bandwidth=50_000.0)
    # Time to first token: 1200 FLOP at 400 FLOP/s is a 3 s floor; 4 s measured is 4/3 of it.
    assert result["time_to_first_token_floor_seconds"] == 3.0
    assert abs(result["time_to_first_token_over_floor"] - 4 / 3) < 1e-12
    # Decode: 500 bytes at 50 000 B/s is a 10 ms floor; 20 ms measured is twice it, 50% of the bandwidth.
    assert result["decode_floor_ms_per_token"] == 10.0 and result["decode_over_floor"] == 2.0
    assert result["decode_bandwidth_fraction"] == 0.5
    assert result["vision_speedup_vs_original"] == 3.0 and result["vision_speedup_vs_original_batch2"] == 4.0
    assert result["vision_seconds_per_image"]["ours_batch2"] == 0.75
    assert result["decode_overhead_vs_bare_llm"] == 2.0 and result["peak_memory_ratio_vs_original"] == 0.5
    assert result["vision_fraction_of_matmul_peak"] == 100 / 1.0 / 400 and result["prefill_seconds"] == 2.0
    assert abs(result["features_max_relative_difference"] - 0.01 / 1.01) < 1e-6  # relative to the largest value
    assert "int8_decode_speedup_vs_bf16" not in result and "scaling" not in result


def test_int8_and_scaling_results_come_from_their_measures():
    times = {"vision_batch1": 1.0, "vision_batch4": 1.0, "first_token": 4.0, "decode_batch1": 0.02,
             "decode_batch4": 0.03, "decode_batch1_static_cache": 0.025, "decode_batch16": 0.05,
             "first_token_images1": 4.0, "first_token_images2": 7.0, "first_token_images4": 13.0}  # fmt: skip
    sides = _sides(times, dict(times))
    sides["ours"]["extras"].update(int8_decode=0.01, model_dtype_decode=0.018, int8_token_agreement=0.75,
                                   int8_decode_bytes_per_step=250)  # fmt: skip
    settings = benchmark.BenchSettings(batch_size=4, int8=True, scaling=True)
    peak = {"flops_per_second": 400.0, "size": 2048, "spread": 0.01}
    result = benchmark.summarize(sides, settings, peak, bandwidth=50_000.0)
    assert abs(result["int8_decode_speedup_vs_bf16"] - 1.8) < 1e-12
    assert result["int8_decode_over_floor"] == 2.0  # 250 bytes at 50 000 B/s: 5 ms; 10 ms measured
    assert result["int8_token_agreement"] == 0.75
    assert result["scaling"]["first_token_seconds_by_images"]["ours"] == {"1": 4.0, "2": 7.0, "4": 13.0}
    assert result["scaling"]["decode_ms_per_token_by_batch"]["bare_llm"] == {"1": 20.0, "4": 30.0, "16": 50.0}


def test_the_sides_share_a_process_only_when_both_fit(monkeypatch):
    # 1e9 Florence-2 parameters (0.2e9 of them the decoder) and 3e9 LLM parameters, in bf16 (2 bytes).
    monkeypatch.setattr(benchmark, "_parameter_counts",
                        lambda shape: {"florence2": 1e9, "florence2_decoder": 0.2e9, "llm": 3e9})  # fmt: skip
    shape = benchmark.get_shape("large")
    settings = benchmark.BenchSettings()
    assert benchmark.memory_plan(shape, 25e9, settings) == (False, 24e9, 25e9)  # together: 3 x 2 x 4e9
    assert benchmark.memory_plan(shape, 23e9, settings) == (True, 12e9, 23e9)  # alone: 1.5 x 2 x 4e9 (original)
    int8 = benchmark.BenchSettings(int8=True)  # ours holds an int8 copy of the LLM: 1.5 x 2 x (0.8e9 + 4.5e9)
    assert benchmark.memory_plan(shape, 23e9, int8) == (True, int(15.9e9), 23e9)
    assert benchmark.memory_plan(shape, 11e9, settings) == (None, 12e9, 11e9)
    forced = benchmark.BenchSettings(isolate=True)
    assert benchmark.memory_plan(shape, 25e9, forced)[0] is True


def test_the_scaling_plot_is_a_png_with_one_row_per_shape(tmp_path):
    from PIL import Image

    scaling = {"first_token_seconds_by_images": {"ours": {"1": 1.0, "2": 1.9, "4": 3.7},
                                                 "bare_llm": {"1": 0.8, "2": 1.6, "4": 3.1}},
               "decode_ms_per_token_by_batch": {"ours": {"1": 5.0, "4": 6.0, "16": 9.0},
                                                "bare_llm": {"1": 4.9, "4": 5.9, "16": 8.8}}}  # fmt: skip
    report = {"machine": {"cpu": "Test CPU", "torch_threads": 2},
              "shapes": {"tiny": {"dtype": "float32", "scaling": scaling}, "large": {"skipped": "no room"},
                         "base": {"dtype": "bfloat16", "scaling": scaling}}}  # fmt: skip
    path = benchmark.write_scaling_plot(report, tmp_path / "plots" / "scaling.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > image.width * 0.6  # two rows of panels
    assert sorted(p.name for p in path.parent.iterdir()) == ["scaling.png"]  # no staging file left


def test_missing_extras_are_named(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("torchao", "matplotlib") else
                        find_spec(name))  # fmt: skip
    assert main(["bench", "--shapes", "tiny", "--int8"]) == 1
    assert capsys.readouterr().err.strip() == 'error: --int8 needs torchao: pip install "florence-vl-hf[int8]"'
    assert main(["bench", "--shapes", "tiny", "--plot", "x.png"]) == 1
    assert capsys.readouterr().err.strip() == 'error: --plot needs matplotlib: pip install "florence-vl-hf[plot]"'


@pytest.mark.slow
def test_isolated_sides_int8_and_the_plot_from_the_command_line(tmp_path, capsys):
    """Each side in its own worker process gives the same comparison (the original's features equal ours); int8
    decode is timed compiled against the model dtype; the plot is written."""
    path, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    argv = ["bench", "--shapes", "tiny", "--isolate", "--int8", "--plot", str(plot), "--json", str(path),
            "--device", "cpu", "--repeats", "1", "--warmup", "0", "--decode-tokens", "3", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tiny = json.loads(path.read_text())["shapes"]["tiny"]
    assert tiny["isolated"] is True and "| sides measured | one process each |" in printed
    assert tiny["features_max_relative_difference"] < 1e-5
    for key in ("vision_speedup_vs_original", "vision_fraction_of_matmul_peak", "time_to_first_token_over_floor",
                "decode_over_floor", "int8_decode_speedup_vs_bf16", "peak_memory_ratio_vs_original"):  # fmt: skip
        assert tiny[key] > 0, key
    assert 0 <= tiny["int8_token_agreement"] <= 1
    assert set(tiny["scaling"]["decode_ms_per_token_by_batch"]["ours"]) == {"1", "4", "16"}
    assert plot.is_file() and f"wrote {plot}" in printed


def test_decode_bytes_count_what_a_step_reads(tiny_phi3):
    model, _ = tiny_phi3
    llm = model.model.language_model
    weights = {id(p): p for m in (llm, model.lm_head) for p in m.parameters()}
    expected = sum(p.numel() * p.element_size() for p in weights.values())
    expected += sum(b.numel() * b.element_size() for b in llm.buffers())
    if not model.config.text_config.tie_word_embeddings:
        expected -= llm.get_input_embeddings().weight.numel() * llm.get_input_embeddings().weight.element_size()
    assert benchmark.decode_bytes_per_step(model) == expected


def test_int8_weights_count_one_byte_per_value_and_their_scales():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    quantize_(linear, Int8WeightOnlyConfig())
    scale = linear.weight.scale
    assert benchmark._stored_bytes(linear.weight) == 32 * 64 + scale.numel() * scale.element_size()


def test_an_int8_model_s_decode_bytes_are_its_int8_values_scales_and_the_rest(tiny_phi3, tmp_path):
    pytest.importorskip("torchao")
    from transformers import AutoModelForImageTextToText

    from florence_vl_hf.quantization import int8_weight_only_config

    model, processor = tiny_phi3
    model.save_pretrained(tmp_path)
    quantized = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                            quantization_config=int8_weight_only_config())  # fmt: skip
    llm, expected = quantized.model.language_model, 0
    for name, module in llm.named_modules():
        if isinstance(module, torch.nn.Linear):  # int8: one byte per value, one float32 scale per row
            expected += module.out_features * module.in_features + module.out_features * 4
    linear_weights = {id(m.weight) for m in llm.modules() if isinstance(m, torch.nn.Linear)}
    embeddings = llm.get_input_embeddings().weight
    for tensor in (*llm.parameters(), *llm.buffers()):
        if id(tensor) not in linear_weights and tensor is not embeddings:
            expected += tensor.numel() * tensor.element_size()  # norms, rotary buffers: bf16 / float32 as stored
    head = quantized.lm_head.weight  # kept in bf16
    expected += head.numel() * 2 if head is not embeddings else embeddings.numel() * 2
    assert quantized.model.language_model.layers[0].mlp.down_proj.weight.scale.dtype == torch.float32
    assert benchmark.decode_bytes_per_step(quantized) == expected
