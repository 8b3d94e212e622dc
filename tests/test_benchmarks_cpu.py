"""Smoke test of `benchmarks/train_step.py` on CPU (the 8 fake devices of conftest.py): the tiny
config for 2 timed steps, its JSON record, its arithmetic (tokens/s, TFLOP/s, MFU) and the table mode,
so the benchmark cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_step.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = _run("--config=configs/dense_tiny.py", "--config.data.seq_len=32", "--config.data.global_batch_size=8",
                "--config.train.peak_flops_per_device=1e12", "--steps=2", "--warmup=1", "--label=tiny-cpu",
                f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout, proc.stdout
    return json.loads(out.read_text()), out


def test_record_matches_the_run(record):
    r, _ = record
    from configs import dense_tiny
    from sparsejax.model import count_params
    from sparsejax.training import metrics as metrics_lib

    config = dense_tiny.get_config()
    config.data.seq_len, config.data.global_batch_size = 32, 8
    assert r["label"] == "tiny-cpu" and r["platform"] == "cpu"
    assert r["num_devices"] == 8 and r["mesh"]["fsdp"] == 8           # sharded exactly as the loop shards
    assert r["params"] == count_params(config)
    assert (r["global_batch_size"], r["seq_len"], r["steps"], r["warmup"]) == (8, 32, 2, 1)
    assert r["train_flops_per_token"] == pytest.approx(metrics_lib.train_flops_per_token(config))
    assert r["step_time_min_s"] <= r["step_time_s"] and r["compile_s"] >= r["lower_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
    tflops = r["train_flops_per_token"] * r["tokens_per_s"] / 8 / 1e12
    assert r["tflops_per_device"] == pytest.approx(tflops)
    assert r["peak_flops_per_device"] == 1e12 and r["mfu"] == pytest.approx(tflops)
    assert r["first_loss"] == pytest.approx(5.78, abs=0.3)            # ~ln(320): random ids, fresh model
    assert r["config"]["model"]["d_model"] == config.model.d_model


def test_dense_variant_reports_causal_half_of_the_square():
    from configs import dense_tiny
    from sparsejax.attention import get_attention

    config = dense_tiny.get_config()
    m, t = config.model, 1000
    assert get_attention("dense").attention_flops(config, t) == pytest.approx(2 * t * t * m.num_heads * m.head_dim)


def test_table_mode(record):
    _, out = record
    proc = _run(f"--table={out.parent}/*.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["label", "B"] and lines[2].startswith("tiny-cpu")
    missing = _run(f"--table={out.parent}/nothing*.json")
    assert missing.returncode != 0 and "matches no file" in missing.stderr


@pytest.mark.parametrize("script, args", [
    ("nsa.py", ["--lengths", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dense", "xla",
                "--implementation", "xla", "--dtype", "float32", "--l", "8", "--d", "4", "--lp", "16", "--n", "4",
                "--w", "32", "--wb", "16", "--breakdown", "--profile"]),
    ("kernels.py", ["--interpret", "--no-tokamax", "--sections", "a,b", "--dense-lengths", "128",
                    "--density-lengths", "128"]),
    ("mosaic_fwd.py", ["--interpret"]),  # pallas_gpu interpreted, the Mosaic GPU kernel lowered for CUDA
    ("mosaic_bwd.py", ["--interpret"]),  # the Mosaic GPU backward lowered for CUDA, pallas_gpu interpreted
])
def test_attention_benchmarks_run_on_cpu(tmp_path, script, args):
    """The attention benchmark scripts at tiny sizes (the kernels in interpret mode): they run to the
    end and write rows without errors other than the GPU-only anchors (cuDNN)."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    errors = {k: v for k, v in result.get("errors", {}).items() if "cudnn" not in k.lower()}
    assert not errors, errors
    assert len(json.dumps(result)) > 200


def test_l2_gather_runs_on_cpu(tmp_path):
    """benchmarks/l2_gather.py at 256 tokens: its Triton gather kernel (interpreted) sums exactly the
    blocks the selection lists name, for both list patterns; its TMA kernel lowers for CUDA."""
    out = tmp_path / "l2.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "l2_gather.py"), "--interpret",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["gather"]
    assert set(rows) == {"anchor_256", "causal16_256"}
    for row in rows.values():
        assert row["check_max_abs"] < 1e-4 and row["kv_gbytes"] > 0
        assert {"gather_w2s2", "gather_k_only_w2s2", "gather_shared_w2s2"} <= set(row)


def test_kernels_lists_section_runs_on_cpu(tmp_path):
    """benchmarks/kernels.py --sections lists at T=256 (two 128-blocks, kernels in interpret mode):
    every list shape timed forward and forward+backward with no stagger and two stagger spans, over
    the blocks its layout lists, and the staggered results equal to the unstaggered up to bf16
    rounding."""
    out = tmp_path / "lists.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--interpret",
                           "--sections", "lists", "--lists-length", "256", "--lists-staggers", "1048576,1",
                           "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result.get("errors"), result.get("errors")
    # nq = 2 query blocks, 8 KV-head units; NSA: 4 KV heads x 256 one-token units, each listing its own
    # 64-block and every earlier one (at most 16)
    expected = {"ramp": 8 * (1 + 2), "uniform_prefix": 8 * 2 * 1, "uniform_band": 8 * 2 * 1,
                "bimodal": 8 * (0 + 2), "nsa_select": 4 * 64 * (1 + 2 + 3 + 4)}
    rows = result["lists"]["rows"]
    assert sorted((r["shape"], r["mode"], r["stagger"]) for r in rows) == sorted(
        (shape, mode, span) for shape in expected for mode in ("fwd", "fwd_bwd") for span in (0, 1, 1 << 20))
    for r in rows:
        assert r["blocks"] == expected[r["shape"]] and r["ms"] > 0
        assert r["ns_per_block"] == pytest.approx(1e6 * r["ms"] / r["blocks"])
        if r["stagger"] == 1:  # starts spread over one entry: every walk starts at entry 0
            assert r["rel_diff"] == 0.0, r
        elif r["stagger"]:
            assert 0 <= r["rel_diff"] < 2e-2, r
        else:
            assert r["rel_diff"] is None, r
    assert any(r["rel_diff"] for r in rows)  # the stagger reached the kernels: the sums' order changed


def test_ring_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/ring.py --smoke (8 fake CPU devices, tiny shapes): the value check (ring on 8 devices
    against one, float32) agrees, scaling over 1, 2, 4 devices and the per-step layouts run, and the
    layouts timed alone list exactly the blocks of the ring's balance report."""
    out = tmp_path / "ring.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ring.py"), "--smoke",
                           "--sections=check,scaling,step_layouts", f"--out={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check"]["devices"] == 8
    for balance in ("zigzag", "striped"):
        for name, err in result["check"][balance].items():
            assert err["max_abs_over_max_ref"] < 1e-5 and err["same_nonfinite"] and not err["nan"], (balance, name, err)
    scaling = {row["gpus"]: row for row in result["scaling"]}
    assert sorted(scaling) == [1, 2, 4] and all(row["efficiency"] > 0 for row in scaling.values())
    layouts = {row["layout"]: row for row in result["step_layouts"]}
    assert layouts["causal"]["blocks"] == scaling[1]["blocks_max_per_device"]
    report = scaling[4]["blocks_per_device_step"]
    for device in (0, 3):
        timed = [row["blocks"] for name, row in layouts.items() if name.startswith(f"device {device} ")]
        assert timed == report[device] and all(row["us_per_block"] > 0 for row in layouts.values())
