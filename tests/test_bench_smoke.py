"""benchmarks/optim_step.py at tiny scale (runs, writes its JSON and markdown section); the ConAdv overlap
benchmarks."""
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "benchmarks", "optim_step.py")
    spec = importlib.util.spec_from_file_location("optim_step_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_paramset_shapes(bench):
    r50 = bench.resnet50_shapes()
    assert len(r50) == 161 and sum(math.prod(s) for s in r50) == 25_557_032
    bert = bench.bert_large_shapes()
    assert len(bert) == 391 and sum(math.prod(s) for s in bert) == 335_141_888
    small = bench.scaled_shapes(r50, 0.01)
    assert len(small) == 161 and abs(sum(math.prod(s) for s in small) - 255_570) < 200


def test_smoke_run_writes_json_and_markdown(bench, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\nintro\n")
    argv = ["--device", "cpu", "--paramset", "resnet50", "--scale", "0.002", "--steps", "2", "--warmup", "1",
            "--threads", "1", "--backends", "foreach", "--only", "LAMB[foreach],AdamW(foreach)",
            "--json", str(out), "--markdown", str(md)]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    for key in ("device", "paramset", "dtype", "n_tensors", "n_params", "steps", "machine", "results",
                "skipped", "baseline", "key"):
        assert key in rep, key
    assert rep["device"] == "cpu" and rep["paramset"] == "resnet50" and rep["dtype"] == "fp32"
    assert rep["n_tensors"] == 161 and rep["key"] == "cpu/resnet50@0.002/fp32"
    names = [r["name"] for r in rep["results"]]
    # the anchor of LAMB-like contenders (torch's fused AdamW) is timed in the same run even when not named
    assert names == ["LAMB[foreach]", "AdamW(foreach)", "AdamW(fused)"], rep["skipped"]
    for r in rep["results"]:
        assert len(r["times_ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"]
        assert r["gbps"] > 0 and r["finite"]
        assert r["anchor"] == "AdamW(fused)" and r["ratio_vs_anchor"] is not None
        assert r["ratio_vs_anchor"] == pytest.approx(r["median_ms"] / rep["results"][2]["median_ms"])
    lamb = rep["results"][0]
    # LAMB moves at least param r+w, grad r, exp_avg and exp_avg_sq r+w: 7 fp32 words per param
    assert lamb["bytes_per_param"] >= 28
    assert rep["results"][2]["ratio_vs_anchor"] == pytest.approx(1.0)
    assert rep["load_avg"] is None or len(rep["load_avg"]["before"]) == 3
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- optim_step:BEGIN cpu/resnet50@0.002/fp32 -->") == 1
    assert "| LAMB[foreach] |" in text
    # a second run replaces its section instead of appending another
    assert bench.main(argv + ["--no-json"]) == 0
    text2 = md.read_text()
    assert text2.count("<!-- optim_step:BEGIN cpu/resnet50@0.002/fp32 -->") == 1
    assert text2.count("<!-- optim_step:END cpu/resnet50@0.002/fp32 -->") == 1


def test_missing_contender_is_skipped_not_fatal(bench, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--scale", "0.001", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--backends", "no-such-backend", "--only", "LAMB[*],AdamW(foreach),deepspeed.*",
            "--json", str(out)]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    skipped = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "LAMB[no-such-backend]" in skipped and skipped["deepspeed.FusedLamb"] == "CUDA only"
    assert [r["name"] for r in rep["results"]] == ["AdamW(foreach)", "AdamW(fused)"]


def test_names_with_commas_and_lars_anchor(bench):
    assert bench.split_names("LARS[cpp],SGD(momentum,fused), AdamW(*)") == ["LARS[cpp]", "SGD(momentum,fused)",
                                                                            "AdamW(*)"]
    chosen = [c.name for c in bench.select_contenders(bench.build_contenders(["foreach"]), "LARS[foreach]")]
    assert chosen == ["LARS[foreach]", "SGD(momentum,fused)"]


def test_competing_process_run_records_it(bench, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--scale", "0.001", "--steps", "2", "--warmup", "0", "--threads", "1",
            "--backends", "foreach", "--only", "LARS[foreach]", "--compete", "1", "--rounds", "2",
            "--tag", "compete", "--json", str(out)]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["compete"] == 1 and len(rep["compete_cpus"]) == 1 and rep["key"].endswith("/compete")
    assert [r["name"] for r in rep["results"]] == ["LARS[foreach]", "SGD(momentum,fused)"]


def test_timm_optimizers_load_without_importing_timm(bench):
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed (pip install --no-deps timm)")
    import torch

    lamb = bench.load_timm_optim("lamb")
    lars = bench.load_timm_optim("lars")
    assert "timm" not in sys.modules or hasattr(sys.modules["timm"], "__file__")
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.5)
    for opt in (lamb.Lamb([p], lr=0.1), lars.Lars([p], lr=0.1)):
        opt.step()
    assert torch.isfinite(p).all()


def test_cli_bench_forwards_arguments(capsys):
    from ds_conadv import cli

    assert cli.main(["bench", "--list", "--backends", "foreach", "--only", "LAMB[*],AdamW(*)"]) == 0
    assert capsys.readouterr().out.split() == ["LAMB[foreach]", "LAMB[foreach,unchecked]", "AdamW(foreach)",
                                               "AdamW(fused)"]


def _overlap_common():
    path = os.path.join(ROOT, "benchmarks", "_common.py")
    spec = importlib.util.spec_from_file_location("overlap_common_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_conadv_overlap_models_have_the_reference_shapes():
    """The overlap benchmarks' ResNets with ImageNet's stem have torchvision's parameter counts (ResNet-18
    11,689,512 and ResNet-50 25,557,032 at 1000 classes, here 10); the CIFAR stem swaps the 7x7 conv for a 3x3; the
    MLP's count is its formula; each model takes a batch of its pool."""
    import torch

    c = _overlap_common()
    head = 990 * 513, 990 * 2049  # the 1000-class heads' extra rows (weights + bias) over 10 classes
    stem = 3 * 64 * (49 - 9)
    for model, reference, extra in (("resnet18", 11_689_512, head[0]), ("resnet50", 25_557_032, head[1])):
        for size, stem_diff in ((224, 0), (32, stem)):
            args = c.parse_args(["--model", model, "--image-size", str(size)])
            assert args.width == 64
            n = sum(p.numel() for p in c.overlap_model(args).parameters())
            assert n == reference - extra - stem_diff, (model, size)
    args = c.parse_args(["--width", "32"])
    n_bn = 2 * 2 * 32  # one BatchNorm1d pair's weight + bias, twice
    assert c.overlap_model_params(args) == 256 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10 + 2 * n_bn
    for argv in (["--width", "32"], ["--model", "resnet18", "--width", "4", "--image-size", "8", "--batch", "2"]):
        args = c.parse_args(argv)
        x, y = c.batch_pool(args, 0, torch.device("cpu"), n=1)[0]
        assert c.overlap_model(args)(x).shape == (len(y), 10)


def test_conadv_overlap_benchmarks_run_at_tiny_size(tmp_path):
    """benchmarks/conadv_overlap.py (DeepSpeed, 2 ranks, the ResNet-18 shape at width 4 on 8x8 images, ZeRO 2 with
    --compare-start, --overlap-comm and a reduce bucket smaller than the gradient) and its table, and, with
    Horovod, benchmarks/conadv_overlap_horovod.py on the MLP: every mode timed, the summary fields and the per-step
    breakdown present."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dist_harness import base_env

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ds.json"
    md = tmp_path / "bench.md"
    tiny = ["--rounds", "2", "--steps-per-round", "1", "--width", "64", "--batch", "8"]
    conv = ["--rounds", "2", "--steps-per-round", "1", "--model", "resnet18", "--width", "4", "--image-size", "8",
            "--batch", "2"]
    subprocess.run([sys.executable, str(root / "benchmarks" / "conadv_overlap.py"), *conv, "--compare-start",
                    "--overlap-comm", "--reduce-bucket", "20000", "--tag", "smoke", "--json", str(out), "--markdown",
                    str(md)],
                   env=base_env(), cwd=root, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    s = report["summary"]
    modes = {"vanilla", "disadv", "conadv", "no_gen", "conadv_bwd", "vanilla_oc", "conadv_oc", "no_gen_oc"}
    assert set(s["median_s"]) == modes | {"gen"}
    assert s["reduction_s"] > 0 and "exposed_fraction_generation_with_backward" in s
    assert "exposed_fraction_overlap_comm" in s and "conadv_oc/vanilla_oc" in s["ratios"]
    assert report["model"] == "resnet18" and report["reduce_bucket"] == 20000  # ~44 k params: several buckets
    assert report["load_avg"]["before"] and report["load_avg"]["after"]
    assert set(s["phases_s"]) == modes
    assert s["phases_s"]["conadv"]["generation_beside_reduction"] > 0 and s["phases_s"]["no_gen"]["reduction"] > 0
    if sys.platform.startswith("linux"):
        assert set(s["sched"]) == modes | {"gen"} and s["sched"]["conadv"]["cpu_s"] > 0
    text = md.read_text()
    assert "conadv_overlap:BEGIN conadv_overlap/cpu/stage2/resnet18/smoke" in text and "ResNet-18-shaped" in text
    assert "Where a step's time goes" in text
    table = subprocess.run([sys.executable, str(root / "benchmarks" / "conadv_overlap.py"), "--table", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert table.count("\n") == 3 and "| smoke | 2 | 2 |" in table
    refused = subprocess.run([sys.executable, str(root / "benchmarks" / "conadv_overlap.py"), "--stage", "0",
                              "--overlap-comm"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "ZeRO stage 1/2 options" in refused.stderr
    if subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True).returncode == 0:
        hout = tmp_path / "hvd.json"
        subprocess.run([sys.executable, str(root / "benchmarks" / "conadv_overlap_horovod.py"), *tiny,
                        "--json", str(hout)], env=base_env(), cwd=root, check=True, capture_output=True, timeout=300)
        assert set(json.loads(hout.read_text())["summary"]["median_s"]) == {"vanilla", "disadv", "conadv", "no_gen",
                                                                          "gen"}


def test_host_overhead_benchmark_runs_with_noop_kernels(tmp_path):
    """benchmarks/host_overhead.py: a step with no-op kernels (plain and ZeRO layout) writes its JSON."""
    path = os.path.join(ROOT, "benchmarks", "host_overhead.py")
    spec = importlib.util.spec_from_file_location("host_overhead_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from ds_conadv.optim import backends

    saved = dict(backends._cache)
    try:
        for extra in ([], ["--zero-layout"]):
            out = tmp_path / "h.json"
            args = ["--paramset", "resnet50", "--steps", "3", "--warmup", "1", "--json", str(out)]
            assert mod.main(args + extra) == 0
            rep = json.loads(out.read_text())
            assert rep["n_tensors"] == 161 and [r["name"] for r in rep["results"]] == ["LAMB", "LARS"]
            assert all(r["median_us"] > 0 for r in rep["results"]) and rep["zero_layout"] == bool(extra)
    finally:
        backends._cache.clear()
        backends._cache.update(saved)


def test_bench_help_shows_the_subcommand_and_the_summary_once(capsys):
    from ds_conadv.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ds-conadv bench ")
    assert out.count("Optimizer step-time benchmark") == 1
